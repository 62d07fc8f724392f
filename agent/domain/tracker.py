"""Per-machine tracking: CNC signals and meter samples in, finished jobs with energy out.

A :class:`MachineTracker` is fed the readings of one machine's meter and CNC (in arrival
order, on the event loop). It keeps

- the operating state: the node map's rules over the CNC's values, refined by power
  (``ready`` below ``standby_below_w`` is standby, anything below ``off_below_w`` is off);
- the open job: it starts when the CNC has a job key (job id, else program) and enters an
  active state (setup, processing, interrupted); it ends when the key changes or clears, when
  the parts counter rises, or (for program-keyed jobs) when the channel returns to idle;
  one that would end at the instant it began is no job and is dropped;
- meter samples and state changes since the oldest open job began, in preallocated arrays.

A job that has ended waits for the first meter sample after its end, so that the counter can
be interpolated at the exact boundary; then the energy kernel runs and ``on_finished``
receives a :class:`FinishedJob`. If no sample comes within ``close_timeout_s`` the job is
computed with what there is and flagged. The tracker never imports a protocol library.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from energy_agent.core import states
from energy_agent.core.reading import Reading
from energy_agent.core.states import MachineRules
from energy_agent.domain.energy import JobEnergy, JobInputs, capture, compute_job

log = logging.getLogger(__name__)

IDLE_STATES = ("off", "standby", "ready")


@dataclass
class JobInfo:
    key: str
    key_point: str
    start: float
    start_wall: float
    job_id: str | None = None
    program: str | None = None
    product: str | None = None
    serial: str | None = None
    subassembly: str | None = None
    parts_start: int | None = None
    flags: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class FinishedJob:
    machine: str
    info: JobInfo
    end: float
    end_wall: float
    end_reason: str
    parts: int | None
    energy: JobEnergy
    samples: int
    bad_samples: int
    median_interval_s: float | None
    flags: tuple[str, ...]
    inputs: JobInputs | None = None
    """What the energy kernel received, for the raw-sample archive (None: not captured)."""


@dataclass
class _Ending:
    info: JobInfo
    end: float
    end_wall: float
    reason: str
    parts: int | None
    deadline: float


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


class MachineTracker:
    def __init__(self, machine_id: str, rules: MachineRules, *, programs: dict[str, Any] | None = None,
                 standby_below_w: float | None = None, off_below_w: float | None = None,
                 max_gap_s: float, close_timeout_s: float, rollover_kwh: float = 0.0,
                 max_power_w: float = 0.0, lookback_s: float | None = None,
                 on_finished: Callable[[FinishedJob], None], on_ending: Callable[[], None] | None = None):
        self.machine = machine_id
        self.rules = rules
        self.programs = programs or {}
        self.standby_below_w = standby_below_w
        self.off_below_w = off_below_w
        self.max_gap_s = max_gap_s
        self.close_timeout_s = close_timeout_s
        self.rollover_kwh = rollover_kwh
        self.max_power_w = max_power_w
        self.lookback_s = max_gap_s if lookback_s is None else lookback_s
        """Between jobs, samples this far back are kept: a job start stamped at the CNC's instant
        can arrive after later meter samples, and still needs the sample before it."""
        self.on_finished = on_finished
        self.on_ending = on_ending
        """Called when a job has ended and waits for a meter sample after its end: the agent
        reads the meter at once instead of waiting up to a poll interval for its next tick."""

        from energy_agent.domain.samples import (  # local: keeps import order simple
            SampleBuffer,
            StateTimeline,
        )

        self.samples = SampleBuffer()
        self.timeline = StateTimeline()
        self.bad_times: deque[float] = deque()
        self.cnc_values: dict[str, Any] = {}
        self.cnc_state: str | None = None
        self.power: float = math.nan
        self.parts: int | None = None
        self.open: JobInfo | None = None
        self.ending: list[_Ending] = []
        self.meter_ok = True
        self.cnc_ok = True
        self.seen_cnc = False
        self._last_e, self._last_e_t = math.nan, math.nan  # the last valid counter reading
        self._ckpt_t = -math.inf  # the newest sample already in a checkpoint
        self._ckpt_stored = False  # a checkpoint of this machine is stored

    # ------------------------------------------------------------------------ state

    @property
    def state(self) -> str | None:
        c = self.timeline.current
        return None if c is None else states.STATES[c]

    def _derive_state(self) -> str:
        p = self.power
        if self.off_below_w is not None and math.isfinite(p) and p < self.off_below_w:
            return "off"
        s = self.cnc_state or "ready"
        if s == "ready" and self.standby_below_w is not None and math.isfinite(p) and p < self.standby_below_w:
            return "standby"
        return s

    def _update_state(self, t: float) -> None:
        self.timeline.append(t, states.code(self._derive_state()))

    # ------------------------------------------------------------------------ meter

    def on_meter(self, r: Reading) -> None:
        if not r.ok:
            self.bad_times.append(r.t)
            if self.meter_ok:
                self.meter_ok = False
                self._flag_jobs("meter_unavailable")
            self._finish_due(r.t)
            return
        self.meter_ok = True
        for q, why in r.reasons.items():  # e.g. power_w_implausible, energy_import_kwh_nan
            self._flag_at(r.t, f"{q}_{why}")
        e = float(r.values.get("energy_import_kwh", math.nan))
        p = float(r.values.get("power_w", math.nan))
        if self.max_power_w and math.isfinite(p) and abs(p) > 1.5 * self.max_power_w:
            p = math.nan  # implausible: not a measurement
        if r.bad or (math.isnan(e) and math.isnan(p)):
            self.bad_times.append(r.t)
        if (math.isnan(e) and math.isnan(p)) or r.t <= self.samples.last_t:
            self._finish_due(r.t)
            return
        self._check_counter(r.t, e)
        self.samples.append(r.t, e, p)
        if math.isfinite(p):
            self.power = p
        self._update_state(r.t)
        self._finish_due(r.t)

    def _check_counter(self, t: float, e: float) -> None:
        """Log a counter that went back (not a plausible wrap) or jumped further than the
        meter's power allows, once per event. The kernel counts the same events in the job's
        quality and never turns them into energy; this line tells the operator when it happened."""
        if not math.isfinite(e):
            return
        d, dt = e - self._last_e, t - self._last_e_t
        self._last_e, self._last_e_t = e, t
        if not math.isfinite(d):
            return
        limit = 1.5 * self.max_power_w * dt / 3.6e6 if self.max_power_w else math.inf
        if d < 0:
            wrapped = d + self.rollover_kwh
            plausible = wrapped <= limit if self.max_power_w else wrapped <= 0.01 * self.rollover_kwh
            if not (self.rollover_kwh and wrapped >= 0 and plausible):
                log.warning("machine %s: meter energy counter went back from %.6f to %.6f kWh (reset?); "
                            "that interval is not counted as energy", self.machine, e - d, e)
        elif d > limit:
            log.warning("machine %s: meter energy counter jumped by %.6f kWh in %.1f s (more than 1.5 x "
                        "max_power_w %g W could use); that interval is not counted as energy",
                        self.machine, d, dt, self.max_power_w)

    def _flag_at(self, t: float, flag: str) -> None:
        """Flag the jobs whose window holds instant t (the open one, and those waiting to close)."""
        if self.open is not None and t >= self.open.start:
            self.open.flags.add(flag)
        for e in self.ending:
            if e.info.start <= t <= e.end:
                e.info.flags.add(flag)

    # ------------------------------------------------------------------------ CNC

    def on_cnc(self, r: Reading) -> None:
        if not r.ok:
            if self.cnc_ok:
                self.cnc_ok = False
                self._flag_jobs("cnc_unavailable")
            return
        self.cnc_ok = True
        self.cnc_values = dict(r.values)
        self.cnc_state = self.rules.state_of(self.cnc_values)
        self._update_state(r.t)
        self._track_job(r.t, r.wall, self.cnc_values, self.cnc_state, not self.seen_cnc)
        self.seen_cnc = True
        self._finish_due(r.t)

    def _job_key(self, values: dict[str, Any]) -> tuple[str | None, str]:
        for point in self.rules.job.key:
            k = _text(values.get(point))
            if k:
                return k, point
        return None, ""

    @staticmethod
    def _parts(values: dict[str, Any]) -> int | None:
        v = values.get("parts_total")
        try:
            return None if v is None else int(v)
        except (TypeError, ValueError):
            return None

    def _track_job(self, t: float, wall: float, values: dict[str, Any], state: str, first: bool) -> None:
        rule = self.rules.job
        key, point = self._job_key(values)
        active = state in rule.active_states
        parts = self._parts(values)
        rank = rule.key.index
        job = self.open
        if job is not None:
            reason = None
            rose = parts is not None and self.parts is not None and parts > self.parts
            own = _text(values.get(job.key_point))
            if key and key != job.key and rank(point) < rank(job.key_point) and not rose:
                # A better identifier (job id) arrived after the job started under a weaker one
                # (program): the same job, re-keyed, not a new one.
                job.key, job.key_point = key, point
            elif rose and rule.end_on_parts_increment:
                reason = "parts_counter"
            elif own is None:
                reason = "key_cleared"
            elif own != job.key:
                reason = "key_changed"
            elif rule.end_on_idle and job.key_point != rule.key[0] and state in IDLE_STATES:
                reason = "idle"
            if reason:
                self._end(job, t, wall, reason, parts)
                job = None
            else:
                self._fill_info(job, values)
        if job is None and key and active:
            self.open = JobInfo(key=key, key_point=point, start=t, start_wall=wall, parts_start=parts)
            if first:
                self.open.flags.add("started_before_agent")
            if not self.meter_ok:
                self.open.flags.add("meter_unavailable")
            self._fill_info(self.open, values)
        self.parts = parts

    def _fill_info(self, job: JobInfo, values: dict[str, Any]) -> None:
        v = values
        for name in ("job_id", "program", "product", "serial", "subassembly"):
            if getattr(job, name) is None:
                setattr(job, name, _text(v.get(name)))
        table = self.programs.get(job.program or "")
        if table is not None:
            for name in ("product", "subassembly"):
                if getattr(job, name) is None:
                    setattr(job, name, getattr(table, name, None))

    def _end(self, job: JobInfo, t: float, wall: float, reason: str, parts: int | None) -> None:
        if t == job.start:
            # Begun and ended at one instant: no time, no energy, not a job. It is what an
            # instant seen in two halves leaves (a server that writes the nodes of a job's end
            # one by one, read between them: the parts counter and job id of after the end,
            # the active state of before it, then the idle state at the same instant).
            self.open = None
            log.info("%s: %s %s began and ended at the same instant (%s); not a job, not recorded",
                     self.machine, job.key_point, job.key, reason)
            return
        if parts is not None and job.parts_start is not None:
            n = parts - job.parts_start
            parts = n if n >= 0 else None
        else:
            parts = None
        self.ending.append(_Ending(job, t, wall, reason, parts, t + self.close_timeout_s))
        self.open = None
        if self.on_ending is not None:
            self.on_ending()

    def _flag_jobs(self, flag: str) -> None:
        if self.open is not None:
            self.open.flags.add(flag)
        for e in self.ending:
            e.info.flags.add(flag)

    # ------------------------------------------------------------------------ finishing

    def tick(self, now: float) -> None:
        """Called periodically: finishes jobs whose wait for a meter sample has timed out."""
        self._finish_due(now)

    def _finish_due(self, now: float) -> None:
        if not self.ending:
            if self.open is None and (len(self.samples) > 64 or len(self.bad_times) > 64):
                self._trim()  # between jobs only the look-back window is needed
            return
        last = self.samples.last_t
        done = [e for e in self.ending if last >= e.end or now >= e.deadline]
        if not done:
            return
        for e in done:
            self.ending.remove(e)
            if last < e.end:
                e.info.flags.add("no_meter_sample_after_end")
            self.on_finished(self._compute(e))
        self._trim()

    def _compute(self, e: _Ending) -> FinishedJob:
        t, en, p = self.samples.view()
        st_t, st_s = self.timeline.view()
        if len(st_t) == 0:
            st_t, st_s = np.array([e.info.start]), np.array([states.code("ready")], np.uint8)
        energy = compute_job(t, en, p, st_t, st_s, e.info.start, e.end, self.max_gap_s,
                             self.rollover_kwh, self.max_power_w)
        lo, hi = np.searchsorted(t, e.info.start, "left"), np.searchsorted(t, e.end, "right")
        inside = t[lo:hi]
        median = float(np.median(np.diff(inside))) if len(inside) > 1 else None
        bad = sum(1 for b in self.bad_times if e.info.start <= b <= e.end)
        if energy.counter_resets:  # in the job's own flags: archived, so a replay agrees
            e.info.flags.add("counter_reset")
        if energy.counter_jumps:
            e.info.flags.add("counter_jump")
        flags = set(e.info.flags)
        if energy.estimated_kwh > 0:
            flags.add("estimated_energy")
        if energy.coverage < 1.0:
            flags.add("incomplete_coverage")
        inputs = capture(t, en, p, st_t, st_s, e.info.start, e.end, self.max_gap_s, self.rollover_kwh,
                                 self.max_power_w, self.bad_times, e.info.flags)
        return FinishedJob(self.machine, e.info, e.end, e.end_wall, e.reason, e.parts, energy,
                           int(hi - lo), bad, median, tuple(sorted(flags)), inputs)

    def _trim(self) -> None:
        starts = [e.info.start for e in self.ending]
        if self.open is not None:
            starts.append(self.open.start)
        keep = min(starts) if starts else self.samples.last_t - self.lookback_s
        self.samples.trim_before(keep)
        # The state timeline must cover the first kept sample too (it may lie before ``keep``):
        # the kernel needs the state at the start of the interval that contains the job start.
        first = float(self.samples.t[0]) if len(self.samples) else keep
        self.timeline.trim_before(min(keep, first))
        while self.bad_times and self.bad_times[0] < keep:
            self.bad_times.popleft()

    # ------------------------------------------------------------------------ checkpoints

    def checkpoint(self, wall_of) -> tuple[str | None, list[tuple[float, float, float]], float] | None:
        """What to store so that a restarted agent can resume this machine's open jobs.

        Returns None when nothing changed since the last checkpoint; else (body, new samples,
        keep_from): ``body`` the JSON of the open and ending jobs and the state timeline (None
        when no job is open: forget the stored one), the samples taken since the last
        checkpoint as (wall t, e, p), and the wall time before which stored samples are not
        needed any more. ``wall_of`` maps monotonic to wall seconds. Times are stored as wall
        time because the monotonic clock starts anew with the process.
        """
        t, e, p = self.samples.view()
        if self.open is None and not self.ending:
            if not self._ckpt_stored:
                return None
            self._ckpt_stored = False
            self._ckpt_t = -math.inf
            return None, [], 0.0
        new = np.searchsorted(t, self._ckpt_t, side="right")
        rows = [(wall_of(float(t[k])), float(e[k]), float(p[k])) for k in range(int(new), len(t))]
        st_t, st_s = self.timeline.view()

        def job(info: JobInfo) -> dict:
            d = {k: getattr(info, k) for k in ("key", "key_point", "job_id", "program", "product", "serial",
                                               "subassembly", "parts_start")}
            return {**d, "start": wall_of(info.start), "start_wall": info.start_wall, "flags": sorted(info.flags)}

        body = {
            "open": None if self.open is None else job(self.open),
            "ending": [{"info": job(x.info), "end": wall_of(x.end), "end_wall": x.end_wall, "reason": x.reason,
                        "parts": x.parts} for x in self.ending],
            "timeline": [[wall_of(float(a)), int(b)] for a, b in zip(st_t, st_s)],
            "bad_times": [wall_of(b) for b in self.bad_times],
            "parts": self.parts,
        }
        if len(t):
            self._ckpt_t = float(t[-1])
        self._ckpt_stored = True
        return json.dumps(body), rows, wall_of(float(t[0])) if len(t) else 0.0

    def restore(self, body: dict, rows: list[tuple[float, float, float]], mono_of, now: float) -> None:
        """Resume from a checkpoint written by a previous run (``mono_of`` maps wall to
        monotonic seconds of this run). Resumed jobs carry the flag ``resumed_after_restart``;
        the counter delta across the outage is measured energy, and the outage shows as a gap
        in the record's quality (gap_count, longest_gap_s)."""

        def job(d: dict) -> JobInfo:
            info = JobInfo(key=d["key"], key_point=d["key_point"], start=mono_of(d["start"]),
                           start_wall=d["start_wall"], job_id=d["job_id"], program=d["program"],
                           product=d["product"], serial=d["serial"], subassembly=d["subassembly"],
                           parts_start=d["parts_start"], flags=set(d["flags"]))
            info.flags.add("resumed_after_restart")
            return info

        for wall_t, e, p in rows:
            t = mono_of(wall_t)
            if t > self.samples.last_t:
                self.samples.append(t, e, p)
                if math.isfinite(p):
                    self.power = p
        for wall_t, code in body.get("timeline", []):
            self.timeline.append(mono_of(wall_t), int(code))
        self.bad_times.extend(mono_of(b) for b in body.get("bad_times", []))
        self.parts = body.get("parts")
        if body.get("open"):
            self.open = job(body["open"])
        for x in body.get("ending", []):
            end = mono_of(x["end"])
            self.ending.append(_Ending(job(x["info"]), end, x["end_wall"], x["reason"], x["parts"],
                                       max(end, now) + self.close_timeout_s))
        self._ckpt_t = self.samples.last_t
        self._ckpt_stored = True
