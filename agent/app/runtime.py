"""The agent process: drivers, trackers, ledger and publisher on one asyncio loop.

Start-up: the kernel worker process is spawned (it loads the energy kernels from numba's
cache while the agent goes on), the ledger is opened, open spans are restored from their
checkpoints, then device tasks start. Every task is
kept referenced and cancelled on shutdown; a device that fails is logged once per outage and
becomes a data-quality flag on its jobs, never a crash of the agent.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from energy_agent.app.config import Loaded
from energy_agent.app.kernels import KernelWorker
from energy_agent.core.clock import Clock, sleep_or_stop
from energy_agent.core.errors import AgentError, DuplicateRecord
from energy_agent.core.reading import Availability
from energy_agent.core.record import Record
from energy_agent.domain.spans import Finished, FinishedJob
from energy_agent.domain.tracker import MachineTracker, Pending
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.opcua import CncDriver
from energy_agent.records import record
from energy_agent.records.archive import ArchiveWriter
from energy_agent.records.ledger import Ledger

log = logging.getLogger(__name__)


LATENESS_KEPT = 65536
"""Most recent meter-poll lateness values kept between two stats reports (a fixed ring)."""
LATENESS_EDGES_MS = np.concatenate([np.arange(0.0, 200.0, 1.0), np.arange(200.0, 2000.0, 10.0),
                                    np.arange(2000.0, 10001.0, 100.0), [np.inf]])
"""Bin edges of the cumulative lateness histogram (ms): percentiles over any span from two reads."""


@dataclass
class Stats:
    polls: int = 0
    poll_errors: int = 0
    records: int = 0
    jobs: int = 0
    """Of ``records``, job records (the rest are intervals between jobs)."""
    skipped_ticks: int = 0
    """Meter poll ticks skipped because a poll ended after its next tick was due."""
    extra_polls: int = 0
    """Meter reads out of schedule, at job ends (also counted in ``polls``)."""
    started: float = field(default_factory=time.monotonic)
    lateness: list[float] = field(default_factory=lambda: [0.0] * LATENESS_KEPT)
    """Real seconds from when each meter poll was due to when its reading was handled (a ring)."""
    late_n: int = 0
    late_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENESS_EDGES_MS) - 1, np.int64))
    _window_from: int = 0

    def late(self, seconds: float) -> None:
        self.lateness[self.late_n % LATENESS_KEPT] = seconds
        self.late_n += 1

    def window(self) -> dict:
        """Poll lateness since the last call (at most the last LATENESS_KEPT polls) in ms, the
        cumulative lateness histogram and the counters: one periodic stats report."""
        n = min(self.late_n - self._window_from, LATENESS_KEPT)
        lo, hi = (self.late_n - n) % LATENESS_KEPT, self.late_n % LATENESS_KEPT
        ring = self.lateness
        ms = np.array(ring[lo:hi] if n and lo < hi else ring[lo:] + ring[:hi] if n else []) * 1000.0
        self._window_from = self.late_n
        self.late_hist += np.histogram(np.maximum(ms, 0.0), LATENESS_EDGES_MS)[0]
        p50, p99 = np.percentile(ms, [50, 99]) if n else (float("nan"), float("nan"))
        return {"polls": self.polls, "poll_errors": self.poll_errors, "records": self.records,
                "skipped_ticks": self.skipped_ticks, "extra_polls": self.extra_polls, "window_polls": int(n), "late_p50_ms": float(p50),
                "late_p99_ms": float(p99), "late_max_ms": float(ms.max()) if n else float("nan"),
                "late_hist": self.late_hist.tolist()}


def _name(span: Finished) -> str:
    """'job J-1001' or 'idle interval', for log lines."""
    return f"job {span.info.key}" if isinstance(span, FinishedJob) else f"{span.kind} interval"


def spread_phases(meters: list[tuple[str, tuple]]) -> dict[str, float]:
    """First-poll phase (fraction of the poll interval) of each (meter id, bus key).

    Meters that share a connection take turns: polled at the same instant, the last waits for
    all the others. Meter k of the n on bus b of B starts at (k + b / B) / n of its interval,
    so each bus sees its meters one after the other and the event loop sees every meter at
    its own instant, instead of all of them in one burst per interval.
    """
    buses: dict[tuple, list[str]] = {}
    for meter_id, key in meters:
        buses.setdefault(key, []).append(meter_id)
    out = {}
    for b, ids in enumerate(buses.values()):
        for k, meter_id in enumerate(ids):
            out[meter_id] = (k + b / len(buses)) / len(ids)
    return out


class Agent:
    store_retry_s = (1.0, 30.0)
    """Backoff (min, max) while the ledger refuses records."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        cfg = loaded.config
        self.cfg = cfg
        self.clock = Clock(cfg.clock.speed, cfg.clock.anchor_s())
        self.ledger = Ledger(cfg.ledger.path if cfg.ledger.path.is_absolute() else loaded.base / cfg.ledger.path)
        self.config_hash = cfg.config_hash()
        self.stats = Stats()
        self.finished: asyncio.Queue[Pending] = asyncio.Queue(cfg.ledger.hold_max)
        self.publisher = None
        self.mqtt = None
        self.status = None
        self.archive = None
        self.fatal: str | None = None
        """Why the agent stopped by itself (the CLI exits non-zero)."""
        self._stop: asyncio.Event | None = None
        self.stats_interval_s: float | None = None
        """Log a stats line (polls, poll lateness) every this many real seconds; None: never."""
        self.stats_file: Path | None = None
        """Where each stats report (the last at exit) is written as JSON, with the cumulative
        lateness histogram (bins: LATENESS_EDGES_MS)."""
        self.kernels = KernelWorker()
        """The energy kernels, in a process of their own (no numba or LLVM in this one)."""
        self.trackers: dict[str, MachineTracker] = {}
        self.by_meter: dict[str, MachineTracker] = {}
        self.by_cnc: dict[str, MachineTracker] = {}
        self.buses: dict[tuple, ModbusBus] = {}
        self.meters: list[MeterDriver] = []
        self.phase: dict[str, float] = {}
        """Meter id -> fraction of its poll interval by which its first poll is delayed."""
        self.cncs: list[CncDriver] = []
        self.meter_by_id: dict[str, MeterDriver] = {}
        self.availability: dict[str, Availability] = {}
        self._poll_locks: dict[str, asyncio.Lock] = {}
        """Per meter: a scheduled poll and a read at a job's end never overlap, so the tracker
        gets the meter's readings in the order they were taken."""
        self._extra_pending: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._build()

    def _build(self) -> None:
        cfg, loaded = self.cfg, self.loaded
        for m in cfg.machines:
            meter = cfg.meter(m.meter)
            profile = loaded.profiles[meter.id]
            nodemap = loaded.nodemaps[m.cnc]
            tracker = MachineTracker(
                m.id, nodemap.rules, programs=dict(m.programs),
                standby_below_w=m.standby_below_w, off_below_w=m.off_below_w,
                max_gap_s=m.max_gap_s or 5 * meter.poll_interval_s,
                close_timeout_s=m.close_timeout_s or 10 * meter.poll_interval_s,
                rollover_kwh=profile.counter_rollover_kwh(), max_power_w=profile.max_power_w or 0.0,
                lookback_s=(m.max_gap_s or 5 * meter.poll_interval_s) + 4 * cfg.cnc(m.cnc).interval_s,
                counter_step_kwh=profile.counter_step_kwh(), counter_float32=profile.counter_is_float32(),
                stale_min_s=max(60.0, 5 * meter.poll_interval_s), compute=None,
                interval_s=m.interval_s, outage_close_s=m.outage_close_s,
                on_finished=self._finished, on_ending=self._read_soon(meter.id),
            )
            self.trackers[m.id] = tracker
            self.by_meter[meter.id] = tracker
            self.by_cnc[m.cnc] = tracker
        for meter in cfg.meters:
            bus = self.buses.get(meter.bus_key())
            if bus is None:
                bus = self.buses[meter.bus_key()] = ModbusBus.for_meter(meter)
            driver = MeterDriver(meter.id, meter.unit_id, loaded.profiles[meter.id], bus, self.clock,
                                 timeout_s=meter.timeout_s, retries=meter.retries, pause_s=meter.pause_s)
            self.meters.append(driver)
            self.meter_by_id[meter.id] = driver
            self.availability[meter.id] = Availability(f"meter {meter.id}")  # one line per outage, none per flap
            self._poll_locks[meter.id] = asyncio.Lock()
        self.phase = spread_phases([(m.id, m.bus_key()) for m in cfg.meters])
        for c in cfg.cncs:
            tracker = self.by_cnc.get(c.id)
            if tracker is None:
                log.warning("cnc %s is not assigned to a machine; not polled", c.id)
                continue
            self.cncs.append(CncDriver(c.id, c.endpoint, loaded.nodemaps[c.id], loaded.node_ids[c.id], self.clock,
                                       self._on_cnc(c.id, tracker), mode=c.mode, interval_s=c.interval_s,
                                       timeout_s=c.timeout_s, timestamps=c.timestamps,
                                       security=loaded.security[c.id], watchdog_intervals=c.watchdog_intervals,
                                       settle_s=c.settle_s))

    def _on_cnc(self, device_id: str, tracker: MachineTracker):
        # Per point (the driver logs the connection's outages itself): a CNC sends readings on
        # changes only and names every point that is not Good in each, so one good reading ends
        # a point's outage (a meter's needs three polls, as it flaps on a timer).
        availability = self.availability[device_id] = Availability(f"cnc {device_id}", back_after=1)

        def on_cnc(r) -> None:
            if r.ok:
                for level, line in availability.update(r, asyncio.get_running_loop().time()):
                    log.log(level, "%s", line)
            if self.status is not None:
                self.status.device(device_id, r.ok, r.error)
            tracker.on_cnc(r)
        return on_cnc

    # ---------------------------------------------------------------- tasks

    def _handle_meter(self, driver: MeterDriver, r, now: float) -> None:
        self.stats.polls += 1
        if self.stats.polls == 1:
            log.info("first meter poll done (%s, %s) %.3f s after start", driver.device_id,
                     "ok" if r.ok else "failed", time.monotonic() - self.stats.started)
        if not r.ok:
            self.stats.poll_errors += 1
        availability = self.availability[driver.device_id]
        for level, line in availability.update(r, now):
            log.log(level, "%s", line)
        if self.status is not None:  # the same hysteresis as the log: a flapping meter is one outage
            self.status.device(driver.device_id, None not in availability.down, r.error)
        tracker = self.by_meter.get(driver.device_id)
        if tracker is not None:
            tracker.on_meter(r)

    def _read_soon(self, meter_id: str):
        """A job on this meter's machine has ended: read the meter now (after a poll in flight),
        so the sample after the job's end comes in milliseconds, not up to a poll interval later.
        At most one such read waits per meter; it is an extra poll, the schedule is unchanged."""
        def read_soon() -> None:
            if self._stop is None or self._stop.is_set() or meter_id in self._extra_pending:
                return
            self._extra_pending.add(meter_id)
            task = asyncio.get_running_loop().create_task(self._read_now(meter_id), name=f"read {meter_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return read_soon

    async def _read_now(self, meter_id: str) -> None:
        driver = self.meter_by_id[meter_id]
        try:
            async with self._poll_locks[meter_id]:
                self._extra_pending.discard(meter_id)
                r = await driver.poll()
                self.stats.extra_polls += 1
                self._handle_meter(driver, r, asyncio.get_running_loop().time())
        finally:
            self._extra_pending.discard(meter_id)

    async def _poll_meter(self, driver: MeterDriver, stop: asyncio.Event) -> None:
        interval = self.clock.real_seconds(self.cfg.meter(driver.device_id).poll_interval_s)
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval * self.phase.get(driver.device_id, 0.0)
        lock = self._poll_locks[driver.device_id]
        if await sleep_or_stop(stop, next_at - loop.time()):
            return
        while not stop.is_set():
            async with lock:
                r = await driver.poll()
                self._handle_meter(driver, r, loop.time())
            now = loop.time()
            self.stats.late(now - next_at)
            next_at += interval
            if next_at < now:  # fell behind: skip missed ticks rather than burst
                self.stats.skipped_ticks += int((now - next_at) // interval) + 1
                next_at = now + interval - ((now - next_at) % interval)
            # A plain sleep: run() cancels this task on stop, and sleep_or_stop's wait_for costs a
            # task per poll (about 60 us of CPU; 12 % of a core at 2000 polls/s).
            await asyncio.sleep(next_at - now)

    def _report_stats(self) -> None:
        w = self.stats.window()
        # CNC instants handed over at the end of a publish response, and after a quiet period
        w["cnc_instants"] = {k: sum(d.settled[k] for d in self.cncs) for k in ("publish", "quiet")}
        log.info("stats: %d polls in window, lateness p50 %.1f ms p99 %.1f ms max %.1f ms; totals: polls %d, "
                 "errors %d, skipped ticks %d, records %d", w["window_polls"], w["late_p50_ms"], w["late_p99_ms"],
                 w["late_max_ms"], w["polls"], w["poll_errors"], w["skipped_ticks"], w["records"])
        if self.stats_file is not None:
            try:
                tmp = self.stats_file.with_name(self.stats_file.name + ".tmp")
                tmp.write_text(json.dumps({**w, "uptime_s": time.monotonic() - self.stats.started}))
                tmp.replace(self.stats_file)
            except OSError as exc:
                log.warning("cannot write the stats file %s: %s", self.stats_file, exc)

    async def _stats_reporter(self, stop: asyncio.Event) -> None:
        assert self.stats_interval_s is not None
        while not await sleep_or_stop(stop, self.stats_interval_s):
            self._report_stats()

    async def _ticker(self, stop: asyncio.Event) -> None:
        all_seen = False
        while not stop.is_set():
            now = self.clock.mono()
            for t in self.trackers.values():
                t.tick(now)
            if not all_seen and all(t.seen_cnc and len(t.samples) for t in self.trackers.values()):
                all_seen = True
                log.info("all devices answering (%.1f s after start)", time.monotonic() - self.stats.started)
                # What exists now (config, drivers, connections, kernels) lives as long as the
                # process: keep it out of the cyclic collector, whose full passes over it otherwise
                # take 100-200 ms with thousands of devices and delay every poll due meanwhile.
                # freeze() alone, no collect() first: that would block the loop for as long, with
                # requests in flight whose timeouts would then fire.
                gc.freeze()
            await sleep_or_stop(stop, 0.5)

    def _build_record(self, span: Finished) -> Callable[[int, str], Record]:
        cfg, loaded = self.cfg, self.loaded
        machine = next(m for m in cfg.machines if m.id == span.machine)
        factor, meter, cnc = loaded.factor(machine.emission_factor), loaded.meter_ref(machine.meter), loaded.cnc_ref(machine.cnc)

        def build(seq: int, prev_hash: str) -> Record:
            return record.build(site=cfg.site, agent=cfg.agent_id, seq=seq, prev_hash=prev_hash, span=span,
                                factor=factor, meter=meter, cnc=cnc, config_hash=self.config_hash)
        return build

    async def _store(self, span: Finished) -> Record | None:
        """Commit a finished span's record; while the ledger fails, keep the span and retry."""
        backoff, failing = 0.0, False
        while True:
            try:
                rec = await self.ledger.append(span.machine, self._build_record(span))
            except DuplicateRecord as exc:
                log.warning("%s", exc)  # the same job finished twice: the first record stands
                return None
            except AgentError as exc:
                if not failing:
                    log.error("ledger cannot store the record of %s %s (%s); holding it and retrying",
                              span.machine, _name(span), exc)
                    failing = True
                backoff = min(self.store_retry_s[1], max(self.store_retry_s[0], backoff * 2))
                await asyncio.sleep(backoff)
                continue
            if failing:
                log.info("ledger accepts records again")
            return rec

    def _finished(self, pending: Pending) -> None:
        try:
            self.finished.put_nowait(pending)
        except asyncio.QueueFull:
            # The ledger has refused records for so long that hold_max spans wait in memory:
            # stop rather than drop. Open spans stay in their checkpoints; this one is logged whole.
            e = pending.ending
            log.critical("ledger.hold_max (%d) finished jobs and intervals held in memory while the ledger refuses "
                         "writes; stopping so that nothing more is lost. Not stored: %s %s %s..%s", self.finished.maxsize,
                         pending.machine, e.info.key if e.info else f"{e.kind} interval", e.start_wall, e.end_wall)
            self.fatal = "ledger refuses writes and the hold is full"
            if self._stop is not None:
                self._stop.set()

    async def _restore(self) -> None:
        """Resume the open jobs of the previous run from their checkpoints."""
        try:
            saved = await self.ledger.load_checkpoints()
        except AgentError as exc:
            log.error("cannot read the open-job checkpoints (%s): open jobs of the previous run are not resumed", exc)
            return
        now = self.clock.mono()
        for machine, (body, rows) in saved.items():
            tracker = self.trackers.get(machine)
            if tracker is None:
                log.warning("checkpoint of machine %s, which is no longer configured: ignored", machine)
                continue
            try:
                tracker.restore(body, rows, self.clock.mono_of_wall, now)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("checkpoint of machine %s is unreadable (%s): not resumed", machine, exc)
                continue
            jobs = ([tracker.open.key] if tracker.open else []) + [e.info.key for e in tracker.ending if e.info]
            if jobs:
                log.info("machine %s: resuming job(s) %s from the checkpoint (%d samples)", machine,
                         ", ".join(jobs), len(rows))

    async def _checkpoint(self) -> None:
        items = []
        for machine, tracker in self.trackers.items():
            c = tracker.checkpoint(self.clock.wall_of_mono)
            if c is not None:
                items.append((machine, *c))
        await self.ledger.save_checkpoints(items)

    async def _checkpointer(self, stop: asyncio.Event) -> None:
        failing = False
        while not await sleep_or_stop(stop, self.cfg.ledger.checkpoint_s):
            try:
                await self._checkpoint()
                if failing:
                    log.info("open-job checkpoints are written again")
                    failing = False
            except Exception as exc:  # noqa: BLE001 - a failing ledger must not stop the polling
                if not failing:
                    log.error("cannot write open-job checkpoints (%s); retrying", exc)
                    failing = True

    async def _pruner(self, stop: asyncio.Event) -> None:
        days = self.cfg.ledger.retention_days
        need_confirmed = bool(self.cfg.mqtt and self.cfg.mqtt.confirm_by)
        while True:
            try:
                pruned = await self.ledger.prune(time.time() - days * 86400.0, need_confirmed)
                if pruned:
                    log.info("pruned delivered records older than %g days: %s", days,
                             ", ".join(f"{m} {n}" for m, n in sorted(pruned.items())))
            except Exception as exc:  # noqa: BLE001
                log.error("pruning the ledger failed: %s", exc)
            if await sleep_or_stop(stop, 3600.0):
                return

    async def _recorder(self) -> None:
        archive = self.archive
        loop = asyncio.get_running_loop()
        while True:
            pending = await self.finished.get()
            try:
                # The energy comes from the kernel worker, off the event loop; spans are
                # computed and stored one at a time, so each machine's chain keeps their order.
                energy = await loop.run_in_executor(None, self.kernels.compute_job, *pending.inputs.args())
                span = pending.finish(energy)
                rec = await self._store(span)
            finally:
                self.finished.task_done()
            if rec is None:
                continue
            self.stats.records += 1
            self.stats.jobs += isinstance(span, FinishedJob)
            if archive is not None:  # after the commit; never waits, never raises
                archive.submit(rec.record_id, span)
            kwh = "unknown" if rec.energy.kwh is None else f"{rec.energy.kwh:.6f}"
            log.log(logging.INFO if isinstance(span, FinishedJob) else logging.DEBUG,
                    "%s on %s: %s kWh (%s, coverage %.3f) seq %d", _name(span), span.machine, kwh,
                    rec.energy.method, rec.quality.coverage, rec.seq)
            if self.publisher is not None:
                self.publisher.notify()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        # The kernels load in their own process while the agent starts polling (a span's
        # energy is first needed when one ends; that call waits for them if it must).
        self.kernels.start()
        loading = loop.run_in_executor(None, self.kernels.wait_ready)
        await self.ledger.open()
        await self._restore()
        self._stop = stop
        self.archive = ArchiveWriter.for_config(self.loaded)  # None when the archive is off
        if self.cfg.mqtt is not None:
            from energy_agent.delivery.mqtt import client_from_config
            from energy_agent.delivery.outbox import Publisher
            from energy_agent.delivery.status import (
                Status,
                offline_payload,
                status_topic,
            )

            m, site, agent_id = self.cfg.mqtt, self.cfg.site, self.cfg.agent_id
            will = (status_topic(m.topic_prefix, site, agent_id), offline_payload(), 1, True) if m.status else None
            self.mqtt = client_from_config(m, self.loaded.base, max_inflight=m.max_inflight, will=will,
                                           client_id=m.client_id or f"energy-agent-{site}-{agent_id}")
            self.publisher = Publisher(self.ledger, self.mqtt, topic_prefix=m.topic_prefix,
                                       max_inflight=m.max_inflight, publish_timeout_s=m.publish_timeout_s,
                                       confirm_by=frozenset(m.confirm_by), resend_after_s=m.resend_after_s,
                                       confirm_topic=f"{m.topic_prefix}/{site}/{agent_id}/confirm")
            if m.status:
                self.status = Status(self.mqtt, prefix=m.topic_prefix, site=site, agent=agent_id,
                                     wall=self.clock.wall)
        tasks = [asyncio.create_task(self._poll_meter(d, stop), name=f"meter:{d.device_id}") for d in self.meters]
        tasks += [asyncio.create_task(c.run(stop), name=f"cnc:{c.device_id}") for c in self.cncs]
        tasks.append(asyncio.create_task(self._ticker(stop), name="ticker"))
        tasks.append(asyncio.create_task(self._checkpointer(stop), name="checkpointer"))
        if self.stats_interval_s:
            tasks.append(asyncio.create_task(self._stats_reporter(stop), name="stats"))
        if self.cfg.ledger.retention_days:
            tasks.append(asyncio.create_task(self._pruner(stop), name="pruner"))
        if self.status is not None:
            tasks.append(asyncio.create_task(self.status.run(stop), name="status"))
        recorder = asyncio.create_task(self._recorder(), name="recorder")
        if self.mqtt is not None:
            tasks.append(asyncio.create_task(self._run_publisher(stop), name="publisher"))
        log.info("agent %s/%s running: %d meters, %d CNCs, %d machines", self.cfg.site, self.cfg.agent_id,
                 len(self.meters), len(self.cncs), len(self.trackers))
        try:
            await stop.wait()
        finally:
            tasks += self._tasks  # reads at job ends still in flight
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:  # store what was finished before stopping
                await asyncio.wait_for(self.finished.join(), 30.0)
            except asyncio.TimeoutError:
                log.error("stopping with %d finished jobs not stored: the ledger is failing",
                          self.finished.qsize() + 1)
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
            if self.archive is not None:
                await asyncio.to_thread(self.archive.close)  # queued frames are written first
            open_jobs = [f"{m}:{t.open.key}" for m, t in self.trackers.items() if t.open is not None]
            try:
                await self._checkpoint()
                if open_jobs:
                    log.info("open jobs checkpointed, resumed at the next start: %s", ", ".join(open_jobs))
            except Exception as exc:  # noqa: BLE001
                log.error("stopping with open jobs %s, whose last checkpoint could not be updated: %s",
                          ", ".join(open_jobs) or "(none)", exc)
            if self.status is not None:
                await self.status.offline()
            if self.stats_interval_s or self.stats_file is not None:
                self._report_stats()
            for bus in self.buses.values():
                await bus.close()
            if self.mqtt is not None:
                await self.mqtt.close()
            await self.ledger.close()
            loading.cancel()
            await asyncio.to_thread(self.kernels.close)

    async def _run_publisher(self, stop: asyncio.Event) -> None:
        assert self.mqtt is not None and self.publisher is not None
        while not stop.is_set():
            try:
                await self.mqtt.connect(timeout=10.0)
                break
            except AgentError as exc:
                log.warning("MQTT broker not reachable yet (%s); records stay in the ledger", exc)
                await sleep_or_stop(stop, 5.0)
        await self.publisher.run(stop)
