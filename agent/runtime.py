"""The agent process: drivers, trackers, ledger and publisher on one asyncio loop.

Start-up order matters: the energy kernels are compiled (or loaded from cache) in a worker
thread before the first poll, the ledger is opened, then device tasks start. Every task is
kept referenced and cancelled on shutdown; a device that fails is logged once per outage and
becomes a data-quality flag on its jobs, never a crash of the agent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from agent import energy, record
from agent.clock import Clock, sleep_or_stop
from agent.config import Loaded
from agent.errors import AgentError, DuplicateRecord
from agent.ledger import Ledger
from agent.machine import FinishedJob, MachineTracker
from drivers.modbus import MeterDriver, ModbusBus
from drivers.opcua import CncDriver

log = logging.getLogger(__name__)


@dataclass
class Stats:
    polls: int = 0
    poll_errors: int = 0
    records: int = 0
    started: float = field(default_factory=time.monotonic)


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
        self.finished: asyncio.Queue[FinishedJob] = asyncio.Queue()
        self.publisher = None
        self.mqtt = None
        self.trackers: dict[str, MachineTracker] = {}
        self.by_meter: dict[str, MachineTracker] = {}
        self.by_cnc: dict[str, MachineTracker] = {}
        self.buses: dict[tuple, ModbusBus] = {}
        self.meters: list[MeterDriver] = []
        self.cncs: list[CncDriver] = []
        self._build()

    def _build(self) -> None:
        cfg, loaded = self.cfg, self.loaded
        for m in cfg.machines:
            meter = cfg.meter(m.meter)
            profile = loaded.profiles[meter.id]
            nodemap = loaded.nodemaps[m.cnc]
            tracker = MachineTracker(
                m.id, nodemap, programs=dict(m.programs),
                standby_below_w=m.standby_below_w, off_below_w=m.off_below_w,
                max_gap_s=m.max_gap_s or 5 * meter.poll_interval_s,
                close_timeout_s=m.close_timeout_s or 10 * meter.poll_interval_s,
                rollover_kwh=profile.counter_rollover_kwh(), max_power_w=profile.max_power_w or 0.0,
                lookback_s=(m.max_gap_s or 5 * meter.poll_interval_s) + 4 * cfg.cnc(m.cnc).interval_s,
                on_finished=self.finished.put_nowait,
            )
            self.trackers[m.id] = tracker
            self.by_meter[meter.id] = tracker
            self.by_cnc[m.cnc] = tracker
        for meter in cfg.meters:
            bus = self.buses.get(meter.bus_key())
            if bus is None:
                bus = self.buses[meter.bus_key()] = ModbusBus.for_meter(meter)
            self.meters.append(MeterDriver(meter.id, meter.unit_id, loaded.profiles[meter.id], bus, self.clock,
                                           timeout_s=meter.timeout_s, retries=meter.retries, pause_s=meter.pause_s))
        for c in cfg.cncs:
            tracker = self.by_cnc.get(c.id)
            if tracker is None:
                log.warning("cnc %s is not assigned to a machine; not polled", c.id)
                continue
            self.cncs.append(CncDriver(c.id, c.endpoint, loaded.nodemaps[c.id], loaded.node_ids[c.id], self.clock,
                                       tracker.on_cnc, mode=c.mode, interval_s=c.interval_s,
                                       timeout_s=c.timeout_s, timestamps=c.timestamps))

    # ---------------------------------------------------------------- tasks

    async def _poll_meter(self, driver: MeterDriver, stop: asyncio.Event) -> None:
        tracker = self.by_meter.get(driver.device_id)
        interval = self.clock.real_seconds(self.cfg.meter(driver.device_id).poll_interval_s)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        down_since: float | None = None
        while not stop.is_set():
            r = await driver.poll()
            self.stats.polls += 1
            if r.ok:
                if down_since is not None:
                    log.info("meter %s: back after %.1f s", driver.device_id, loop.time() - down_since)
                    down_since = None
            else:
                self.stats.poll_errors += 1
                if down_since is None:
                    down_since = loop.time()
                    log.warning("meter %s: unavailable (%s)", driver.device_id, r.error)
            if tracker is not None:
                tracker.on_meter(r)
            next_at += interval
            now = loop.time()
            if next_at < now:  # fell behind: skip missed ticks rather than burst
                next_at = now + interval - ((now - next_at) % interval)
            await sleep_or_stop(stop, next_at - now)

    async def _ticker(self, stop: asyncio.Event) -> None:
        all_seen = False
        while not stop.is_set():
            now = self.clock.mono()
            for t in self.trackers.values():
                t.tick(now)
            if not all_seen and all(t.seen_cnc and len(t.samples) for t in self.trackers.values()):
                all_seen = True
                log.info("all devices answering (%.1f s after start)", time.monotonic() - self.stats.started)
            await sleep_or_stop(stop, 0.5)

    def _build_record(self, job: FinishedJob):
        cfg = self.cfg
        machine = next(m for m in cfg.machines if m.id == job.machine)
        meter = cfg.meter(machine.meter)
        cnc = cfg.cnc(machine.cnc)

        def build(seq: int, prev_hash: str) -> dict:
            return record.build(site=cfg.site, agent=cfg.agent_id, seq=seq, prev_hash=prev_hash, job=job,
                                factor_id=machine.emission_factor,
                                factor=cfg.emission_factors[machine.emission_factor],
                                meter=meter, profile=self.loaded.profiles[meter.id].name, cnc=cnc,
                                config_hash=self.config_hash)
        return build

    async def _store(self, job: FinishedJob) -> dict | None:
        """Commit a finished job's record; while the ledger fails, keep the job and retry."""
        backoff, failing = 0.0, False
        while True:
            try:
                rec = await self.ledger.append(job.machine, self._build_record(job))
            except DuplicateRecord as exc:
                log.warning("%s", exc)  # the same job finished twice: the first record stands
                return None
            except AgentError as exc:
                if not failing:
                    log.error("ledger cannot store the record of %s job %s (%s); holding it and retrying",
                              job.machine, job.info.key, exc)
                    failing = True
                backoff = min(self.store_retry_s[1], max(self.store_retry_s[0], backoff * 2))
                await asyncio.sleep(backoff)
                continue
            if failing:
                log.info("ledger accepts records again")
            return rec

    async def _recorder(self) -> None:
        while True:
            job = await self.finished.get()
            try:
                rec = await self._store(job)
            finally:
                self.finished.task_done()
            if rec is None:
                continue
            self.stats.records += 1
            log.info("job %s on %s: %.6f kWh (%s, coverage %.3f) seq %d", rec["job"]["key"], job.machine,
                     rec["energy"]["kwh"], rec["energy"]["method"], rec["quality"]["coverage"], rec["seq"])
            if self.publisher is not None:
                self.publisher.notify()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        await loop.run_in_executor(None, energy.warm_up)
        log.info("kernels ready in %.2f s", time.monotonic() - t0)
        await self.ledger.open()
        if self.cfg.mqtt is not None:
            from agent.mqtt import client_from_config
            from agent.publish import Publisher

            m = self.cfg.mqtt
            self.mqtt = client_from_config(m, self.loaded.base, max_inflight=m.max_inflight,
                                           client_id=m.client_id or f"energy-agent-{self.cfg.site}-{self.cfg.agent_id}")
            self.publisher = Publisher(self.ledger, self.mqtt, topic_prefix=m.topic_prefix,
                                       max_inflight=m.max_inflight, publish_timeout_s=m.publish_timeout_s)
        tasks = [asyncio.create_task(self._poll_meter(d, stop), name=f"meter:{d.device_id}") for d in self.meters]
        tasks += [asyncio.create_task(c.run(stop), name=f"cnc:{c.device_id}") for c in self.cncs]
        tasks.append(asyncio.create_task(self._ticker(stop), name="ticker"))
        recorder = asyncio.create_task(self._recorder(), name="recorder")
        if self.mqtt is not None:
            tasks.append(asyncio.create_task(self._run_publisher(stop), name="publisher"))
        log.info("agent %s/%s running: %d meters, %d CNCs, %d machines", self.cfg.site, self.cfg.agent_id,
                 len(self.meters), len(self.cncs), len(self.trackers))
        try:
            await stop.wait()
        finally:
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
            open_jobs = [f"{m}:{t.open.key}" for m, t in self.trackers.items() if t.open is not None]
            if open_jobs:
                log.warning("stopping with open jobs not recorded: %s", ", ".join(open_jobs))
            for bus in self.buses.values():
                await bus.close()
            if self.mqtt is not None:
                await self.mqtt.close()
            await self.ledger.close()

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
