"""Per-machine tracking: CNC signals and meter samples in, finished jobs and intervals out.

A :class:`MachineTracker` is fed the readings of one machine's meter and CNC (in arrival
order, on the event loop). It keeps

- the operating state: the state rules over the CNC's values, refined by power (``ready``
  below ``standby_below_w`` is standby, anything below ``off_below_w`` is off);
- the open job: it starts when the CNC has a job key (job id, else program) and enters an
  active state (setup, processing, interrupted); it ends when the key changes or clears, when
  the parts counter rises, or (for program-keyed jobs) when the channel returns to idle; one
  that would end at the instant it began is no job and is dropped;
- the spans of the machine's time: from the first observation on, every moment belongs to a
  job or to an interval between jobs, ``idle`` (observed, no job) or ``unobserved`` (the CNC
  unreachable or its job or state signals Bad, the agent not running). Idle and unobserved
  intervals are cut every ``interval_s`` so that records come regularly;
- meter samples and state changes since the oldest unfinished span began, in preallocated
  arrays.

A span that has ended waits for the first meter sample after its end, so that the counter can
be interpolated at the exact boundary; then the energy kernel runs and ``on_finished``
receives a :class:`FinishedJob` or :class:`FinishedInterval`. If no sample comes within
``close_timeout_s`` the span is computed with what there is and flagged.

Outages (docs/EVIDENCE.md, "Outages"). When the CNC cannot be observed the tracker never
guesses. When observation resumes, the first snapshot (read at once, each value with the
time the CNC reports for its last change) decides:

- nothing relevant changed since the outage began (same job key, same parts count, no change
  stamped after the outage began): the open job, or the idle interval, simply went on; its
  record is flagged with the outage's cause;
- something changed: the job open before the outage ends where it was last seen running (end
  ``estimated``, with the window in which it ended), the time until the snapshot's evidence
  begins is an ``unobserved`` interval (its energy is the meter's, its parts the counter's:
  jobs that ran then are never folded into another job), and a job running in the snapshot
  starts at the time the CNC stamped its key (``source_timestamp``).

An outage longer than ``outage_close_s`` is settled without waiting: the open job ends where
it was last seen running and the time goes on as unobserved.

A meter energy counter that does not move while the power says it must (more than
``STALE_STEPS`` counter steps over at least ``stale_min_s``) is stale: its readings from the
last move on are not used as energy (the kernel integrates power there instead, which the
record reports as estimated) and the spans it touches are flagged ``counter_stale``.
The tracker never imports a protocol library.
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
from energy_agent.core.reading import USABLE_REASONS, Reading
from energy_agent.core.states import MachineRules
from energy_agent.domain.energy import JobEnergy, JobInputs, capture, compute_job
from energy_agent.domain.samples import SampleBuffer, StateTimeline
from energy_agent.domain.spans import (
    AGENT_START,
    ESTIMATED,
    OBSERVED,
    SOURCE_TIMESTAMP,
    Finished,
    FinishedInterval,
    FinishedJob,
    JobInfo,
    span_flags,
)

log = logging.getLogger(__name__)

IDLE_STATES = ("off", "standby", "ready")
STALE_STEPS = 3.0
"""A counter that has not moved while the power says it gained this many of its steps is stale."""
STAMP_SLACK_S = 0.001
"""A CNC stamp this close to the start of an outage counts as from before it (clock rounding)."""


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _iso(wall: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Ending:
    """A span that has ended and waits for a meter sample after its end."""

    kind: str  # job, idle, unobserved
    start: float
    start_wall: float
    end: float
    end_wall: float
    reason: str | None
    deadline: float
    info: JobInfo | None = None
    parts: int | None = None
    end_basis: str = OBSERVED
    end_note: str | None = None
    flags: set[str] = field(default_factory=set)


@dataclass
class _Interval:
    """The open interval between jobs."""

    kind: str  # idle, unobserved
    start: float
    start_wall: float
    reason: str | None = None
    parts_start: int | None = None
    flags: set[str] = field(default_factory=set)


@dataclass
class _Outage:
    """Observation lost at (t, wall) for ``reason``, with what was known just before."""

    t: float
    wall: float
    reason: str
    values: dict[str, Any]
    parts: int | None
    stamps: dict[str, float] = field(default_factory=dict)
    """The CNC's stamps of the values before the outage (its clock, so a change shows as a new
    stamp whatever the CNC's clock error)."""
    settled: bool = False
    """The outage outlasted ``outage_close_s``: what was open has been ended at ``t``."""


@dataclass(frozen=True)
class Pending:
    """A finished span whose energy is still to be computed from ``inputs``."""

    machine: str
    ending: _Ending
    inputs: JobInputs
    samples: int
    bad_samples: int
    median_interval_s: float | None

    def finish(self, energy: JobEnergy) -> Finished:
        """The finished job or interval with ``energy`` (``compute_job(*self.inputs.args())``)."""
        e, flags = self.ending, span_flags(self.inputs.flags, energy)
        if e.info is not None:
            return FinishedJob(self.machine, e.info, e.end, e.end_wall, e.reason or "", e.parts, energy, self.samples,
                               self.bad_samples, self.median_interval_s, flags, self.inputs, e.end_basis, e.end_note)
        return FinishedInterval(self.machine, e.kind, e.reason, e.start, e.start_wall, e.end, e.end_wall, e.parts,
                                energy, self.samples, self.bad_samples, self.median_interval_s, flags, self.inputs)


class MachineTracker:
    def __init__(self, machine_id: str, rules: MachineRules, *, programs: dict[str, Any] | None = None,
                 standby_below_w: float | None = None, off_below_w: float | None = None,
                 max_gap_s: float, close_timeout_s: float, rollover_kwh: float = 0.0,
                 max_power_w: float = 0.0, lookback_s: float | None = None,
                 interval_s: float = 3600.0, outage_close_s: float = 900.0,
                 counter_step_kwh: float = 0.0, counter_float32: bool = False, stale_min_s: float = 60.0,
                 compute: Callable[..., JobEnergy] | None = compute_job,
                 on_finished: Callable[[Any], None], on_ending: Callable[[], None] | None = None):
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
        """Between spans, samples this far back are kept: a change stamped at the CNC's instant
        can arrive after later meter samples, and still needs the sample before it."""
        self.interval_s = interval_s
        self.outage_close_s = outage_close_s
        self.counter_step_kwh = counter_step_kwh
        self.counter_float32 = counter_float32
        self.stale_min_s = stale_min_s
        self.compute = compute
        """``energy.compute_job`` (or a stand-in with its signature): ``on_finished`` gets each
        finished span with its energy. None: ``on_finished`` gets a :class:`Pending` span and
        computes its energy itself (the agent does, off its event loop)."""
        self.on_finished = on_finished
        """Gets each finished span: a :class:`FinishedJob` or :class:`FinishedInterval`, or a
        :class:`Pending` one when ``compute`` is None."""
        self.on_ending = on_ending
        """Called when a span has ended and waits for a meter sample after its end: the agent
        reads the meter at once instead of waiting up to a poll interval for its next tick."""

        self.relevant = set(rules.points()) | {"parts_total"}
        """CNC points whose values decide jobs and states: Bad ones make the CNC unobserved."""
        self.samples = SampleBuffer()
        self.timeline = StateTimeline()
        self.bad_times: deque[float] = deque()
        self.cnc_values: dict[str, Any] = {}
        self.cnc_state: str | None = None
        self.power: float = math.nan
        self.parts: int | None = None
        self.open: JobInfo | None = None
        self.interval: _Interval | None = None
        self.outage: _Outage | None = None
        self.ending: list[_Ending] = []
        self.meter_ok = True
        self.seen_cnc = False
        self.observed = False
        self._stamps: dict[str, float] = {}
        """Per relevant CNC point, the time the CNC stamped on its latest value (its clock)."""
        self._last_cnc: tuple[float, float] | None = None
        """(t, wall) of the latest good CNC reading."""
        self._wall_offset: float | None = None
        """wall - t of the latest reading: to place a CNC's wall stamp on the monotonic axis."""
        self._last_e, self._last_e_t = math.nan, math.nan  # the last valid counter reading
        self._moved_t, self._moved_e = math.nan, math.nan  # when and where the counter last moved
        self._stale_from: float | None = None
        self._expected_kwh = 0.0
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

    def _mono(self, wall: float) -> float:
        assert self._wall_offset is not None
        return wall - self._wall_offset

    # ------------------------------------------------------------------------ meter

    def on_meter(self, r: Reading) -> None:
        self._wall_offset = r.wall - r.t
        if not r.ok:
            self.bad_times.append(r.t)
            if self.meter_ok:
                self.meter_ok = False
                self._flag_open("meter_unavailable")
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
        if self._stale(r.t, e, p):
            e = math.nan
        self.samples.append(r.t, e, p)
        if math.isfinite(p):
            self.power = p
        self._update_state(r.t)
        self._tick_periods(r.t)
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

    def _step_kwh(self, e: float) -> float:
        """The counter's resolution near ``e``: its register step (integer registers), else the
        spacing of the float type it is read as."""
        if self.counter_step_kwh > 0:
            return self.counter_step_kwh
        return float(np.spacing(np.float32(e) if self.counter_float32 else np.float64(e)))

    def _stale(self, t: float, e: float, p: float) -> bool:
        """Whether this counter reading is not to be used as energy (the counter is stale)."""
        if not math.isfinite(e):
            return False
        if e != self._moved_e:
            if self._stale_from is not None:
                log.info("machine %s: meter energy counter moves again after %.0f s; its readings are "
                         "used as energy again", self.machine, t - self._stale_from)
                self._stale_from = None
            self._moved_t, self._moved_e, self._expected_kwh = t, e, 0.0
            return False
        last_t = self.samples.last_t
        if math.isfinite(p) and p > 0 and last_t > self._moved_t:
            self._expected_kwh += p * (t - last_t) / 3.6e6
        elif math.isfinite(p) and p > 0 and last_t <= self._moved_t:
            self._expected_kwh += p * (t - self._moved_t) / 3.6e6
        if self._stale_from is not None:
            return True
        if t - self._moved_t < self.stale_min_s or self._expected_kwh < STALE_STEPS * self._step_kwh(e):
            return False
        self._stale_from = self._moved_t
        log.warning("machine %s: meter energy counter has stayed at %.6f kWh for %.0f s while the power reads "
                    "%.0f W (%.4f kWh expected); its readings are not used as energy until it moves (power "
                    "integration instead, flagged counter_stale)", self.machine, e, t - self._moved_t, p,
                    self._expected_kwh)
        # The readings already taken after the last move are stale too.
        t_col, e_col, _ = self.samples.view()
        e_col[t_col > self._moved_t] = math.nan
        self._flag_from(self._moved_t, "counter_stale")
        return True

    def _flag_at(self, t: float, flag: str) -> None:
        """Flag the spans whose window holds instant t."""
        if self.open is not None and t >= self.open.start:
            self.open.flags.add(flag)
        if self.interval is not None and t >= self.interval.start:
            self.interval.flags.add(flag)
        for e in self.ending:
            if e.start <= t <= e.end:
                e.flags.add(flag)

    def _flag_from(self, t: float, flag: str) -> None:
        """Flag every span that reaches past instant t."""
        if self.open is not None:
            self.open.flags.add(flag)
        if self.interval is not None:
            self.interval.flags.add(flag)
        for e in self.ending:
            if e.end > t:
                e.flags.add(flag)

    def _flag_open(self, flag: str) -> None:
        if self.open is not None:
            self.open.flags.add(flag)
        if self.interval is not None:
            self.interval.flags.add(flag)
        for e in self.ending:
            e.flags.add(flag)

    # ------------------------------------------------------------------------ CNC

    def on_cnc(self, r: Reading) -> None:
        self._wall_offset = r.wall - r.t
        if not r.ok:
            self._lose(r.t, r.wall, "cnc_unavailable")
            self._finish_due(r.t)
            return
        bad = sorted(q for q in r.bad if q in self.relevant and r.reasons.get(q) not in USABLE_REASONS)
        if bad:
            self._lose(r.t, r.wall, "cnc_bad_status")
            self._flag_open("cnc_bad_status")
            self._finish_due(r.t)
            return
        if any(q in self.relevant for q in r.bad):
            self._flag_at(r.t, "cnc_uncertain_status")
        values = dict(r.values)
        if r.initial and self.observed and self._last_cnc is not None:
            # A new connection's first snapshot while no outage was reported: the driver
            # reconnected in between; what happened meanwhile was not observed.
            self._lose(*self._last_cnc, "cnc_unavailable")
        if not self.seen_cnc:
            self._first(r.t, r.wall, values)
        elif not self.observed:
            self._regain(r, values)
        else:
            self._apply(r.t, r.wall, values)
        self._stamps.update((q, s) for q, s in r.stamps.items() if q in self.relevant)
        self._last_cnc = (r.t, r.wall)
        self._finish_due(r.t)

    def _apply(self, t: float, wall: float, values: dict[str, Any]) -> None:
        """An observed instant of the CNC: state and job tracking."""
        self.cnc_values = values
        self.cnc_state = self.rules.state_of(values)
        self._update_state(t)
        self._track_job(t, wall, values, self.cnc_state)

    def _first(self, t: float, wall: float, values: dict[str, Any]) -> None:
        """The first observation: the machine's time is recorded from here on. A job already
        running is recorded from now, its start not observed."""
        self.seen_cnc = self.observed = True
        self.cnc_values = values
        self.cnc_state = self.rules.state_of(values)
        self._update_state(t)
        self.parts = self._parts(values)
        key, point = self._job_key(values)
        if key and self.cnc_state in self.rules.job.active_states:
            self._open_job(t, wall, key, point, values, AGENT_START, "running when the agent began observing")
            self.open.flags.add("started_before_agent")  # type: ignore[union-attr]
        else:
            self.interval = _Interval("idle", t, wall, parts_start=self.parts)

    def _lose(self, t: float, wall: float, reason: str) -> None:
        """Observation lost (the CNC unreachable, or its job or state signals Bad)."""
        if not self.seen_cnc:
            return
        if self.outage is not None:
            return
        self.observed = False
        self.outage = _Outage(t, wall, reason, dict(self.cnc_values), self.parts, dict(self._stamps))
        self._flag_open(reason)

    def _settle_outage(self, now: float) -> None:
        """An outage outlasted ``outage_close_s``: end what was open where it was last seen and
        go on as unobserved."""
        o = self.outage
        assert o is not None and not o.settled
        o.settled = True
        note = f"{o.reason}: observation lost at {_iso(o.wall)} and not back within {self.outage_close_s:g} s"
        if self.open is not None:
            self._end(self.open, o.t, o.wall, "observation_lost", None, ESTIMATED, note)
        elif self.interval is not None:
            self._close_interval(o.t, o.wall, o.reason)
        self.interval = _Interval("unobserved", o.t, o.wall, reason=o.reason, parts_start=o.parts)
        log.warning("machine %s: %s for %.0f s; what was open ended where it was last seen, the time "
                    "since is recorded as unobserved", self.machine, o.reason, now - o.t)

    def _regain(self, r: Reading, values: dict[str, Any]) -> None:
        """The first snapshot after an outage: the job or interval went on, or the outage ends
        it (see the module docstring)."""
        o = self.outage
        assert o is not None
        self.outage = None
        self.observed = True
        t, wall = r.t, r.wall
        stamps = {q: s for q, s in r.stamps.items() if q in self.relevant}
        # A value changed during the outage carries a new stamp: compared with the stamp it had
        # before when known (immune to the CNC's clock error), else with the outage's start.
        changed_at = sorted(s for q, s in stamps.items()
                            if (s != o.stamps[q] if q in o.stamps else s > o.wall + STAMP_SLACK_S))
        key, point = self._job_key(values)
        parts = self._parts(values)
        same = (not changed_at and parts == o.parts and all(values.get(q) == o.values.get(q) for q in self.relevant))
        if same and not o.settled:
            # Nothing relevant changed: what was open simply went on (flagged with the cause).
            self._apply(t, wall, values)
            return
        state = self.rules.state_of(values)
        active = key is not None and state in self.rules.job.active_states
        if not o.settled:
            if self.open is not None and self._end_reason(o, values, stamps) is None:
                self._carry_on(o, values, changed_at, t, wall)  # the job went on; its state may have changed
                return
            keys_still = all(stamps.get(q) == o.stamps.get(q) for q in self.rules.job.key)
            if self.open is None and not active and keys_still and (parts is None or parts == o.parts):
                self._carry_on(o, values, changed_at, t, wall)  # idle went on: no job began or ended
                return

        # 1. What was open when observation was lost ends.
        if not o.settled:
            single = parts is not None and o.parts is not None and 0 <= parts - o.parts <= 1
            ended = self._end_evidence(o, values, stamps) if self.open is not None and single else None
            if ended is not None:
                # The CNC stamped the change that ended it, and no other job ran to its end.
                reason, end_wall = ended[0], min(max(ended[1], o.wall), wall)
                self._end(self.open, self._mono(end_wall), end_wall, reason, parts,  # type: ignore[arg-type]
                          SOURCE_TIMESTAMP, f"{o.reason}: ended while the CNC could not be observed, at the "
                          f"time the CNC stamped on that change ({reason})")
                assert self.interval is not None
                self.interval.flags |= {o.reason, "inferred_from_cnc_timestamps"}
            else:
                if self.open is not None:
                    upper = min(changed_at[0], wall) if changed_at else wall
                    self._end(self.open, o.t, o.wall, "observation_lost", None, ESTIMATED,
                              f"{o.reason}: ended while the CNC could not be observed, between "
                              f"{_iso(o.wall)} and {_iso(upper)}")
                elif self.interval is not None:
                    self._close_interval(o.t, o.wall, o.reason)
                self.interval = _Interval("unobserved", o.t, o.wall, reason=o.reason, parts_start=o.parts)
        assert self.interval is not None

        # 2. Where the snapshot's evidence begins: a running job's key as the CNC stamped it,
        # else the latest change it stamped, else now.
        start_wall = max(min(changed_at[-1], wall), o.wall) if changed_at else wall
        basis = ESTIMATED
        if active and point in stamps and stamps[point] in changed_at:
            start_wall, basis = min(max(stamps[point], o.wall), wall), SOURCE_TIMESTAMP
        if start_wall < self.interval.start_wall:
            # The evidence lies in time already recorded (a stretch cut into periods): the open
            # piece runs to the snapshot (a job in it starts where the piece does, estimated).
            start_wall, basis = (self.interval.start_wall, ESTIMATED) if active else (wall, ESTIMATED)
        start_t = self._mono(start_wall)
        self.cnc_values, self.cnc_state = values, state
        self.timeline.replace_from(start_t, states.code(self._derive_state()))

        # 3. The interval until then ends there; a running job opens there.
        if active:
            why = (f"{o.reason}: started while the CNC could not be observed, at the time the CNC stamped on "
                   "its job key" if basis == SOURCE_TIMESTAMP else f"{o.reason}: running when observation resumed")
            self._open_job(start_t, start_wall, key, point, values, basis, why)  # type: ignore[arg-type]
            job = self.open
            assert job is not None
            if basis != SOURCE_TIMESTAMP or stamps.get("parts_total", -math.inf) > start_wall:
                job.parts_start = None  # parts it made before it was seen: unknown
            if start_t < t:
                job.flags.add("states_estimated")
        elif self.interval.kind == "unobserved":
            self._close_interval(start_t, start_wall, o.reason, parts_end=parts)
            self.interval = _Interval("idle", start_t, start_wall, parts_start=parts)
        self.parts = parts
        self._update_state(t)

    def _end_reason(self, o: _Outage, values: dict[str, Any], stamps: dict[str, float]) -> tuple[str, list[str]] | None:
        """Whether the job rules, applied to the snapshot, end the open job: (reason, the points
        whose change ended it), or None when it went on."""
        job, rule = self.open, self.rules.job
        assert job is not None
        parts, before = self._parts(values), o.parts
        own = _text(values.get(job.key_point))
        if rule.end_on_parts_increment and parts is not None and before is not None and parts > before:
            return "parts_counter", ["parts_total"]
        if own is None:
            return "key_cleared", [job.key_point]
        if own != job.key:
            return "key_changed", [job.key_point]
        k = job.key_point
        if k in stamps and k in o.stamps and stamps[k] != o.stamps[k]:
            return "key_changed", [k]  # cleared and set again meanwhile: another run of it
        if rule.end_on_idle and job.key_point != rule.key[0] and self.rules.state_of(values) in IDLE_STATES:
            return "idle", [q for state in self.rules.states for q in state.when]
        return None

    def _end_evidence(self, o: _Outage, values: dict[str, Any], stamps: dict[str, float]) -> tuple[str, float] | None:
        """(end reason, the CNC's stamp of the change that ended the open job), or None when the
        stamps do not show it."""
        ended = self._end_reason(o, values, stamps)
        if ended is None:
            return None
        reason, points = ended
        changed = [stamps[q] for q in points if q in stamps and stamps[q] != o.stamps.get(q)]
        return (reason, max(changed)) if changed else None

    def _carry_on(self, o: _Outage, values: dict[str, Any], changed_at: list[float], t: float, wall: float) -> None:
        """The open job or idle interval went on through the outage. A state that changed
        meanwhile is placed at the CNC's stamp of its last change (flag ``states_estimated``:
        what happened before that is not known)."""
        self.cnc_values, self.cnc_state = values, self.rules.state_of(values)
        if changed_at:
            at_wall = min(max(changed_at[-1], o.wall), wall)
            self.timeline.replace_from(self._mono(at_wall), states.code(self._derive_state()))
            self._flag_open("states_estimated")
        self._apply(t, wall, values)

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

    def _track_job(self, t: float, wall: float, values: dict[str, Any], state: str) -> None:
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
            self._open_job(t, wall, key, point, values, OBSERVED, None)
        self.parts = parts

    def _open_job(self, t: float, wall: float, key: str, point: str, values: dict[str, Any], basis: str,
                  reason: str | None) -> None:
        if self.interval is not None:
            self._close_interval(t, wall, "job_started", parts_end=self._parts(values))
        info = JobInfo(key=key, key_point=point, start=t, start_wall=wall, parts_start=self._parts(values),
                       start_basis=basis, start_reason=reason)
        if not self.meter_ok:
            info.flags.add("meter_unavailable")
        if self._stale_from is not None:
            info.flags.add("counter_stale")
        self._fill_info(info, values)
        self.open = info

    def _fill_info(self, job: JobInfo, values: dict[str, Any]) -> None:
        """Job id, program, product, serial and subassembly from the CNC, else product and
        subassembly from the machine's program table; ``assignment`` says which."""
        for name in ("job_id", "program", "product", "serial", "subassembly"):
            if getattr(job, name) is None:
                setattr(job, name, _text(values.get(name)))
                if name in ("product", "serial", "subassembly") and getattr(job, name) is not None:
                    job.assignment = job.assignment or "cnc"
        table = self.programs.get(job.program or "")
        if table is not None:
            for name in ("product", "subassembly"):
                if getattr(job, name) is None:
                    setattr(job, name, getattr(table, name, None))
                    if getattr(job, name) is not None:
                        job.assignment = job.assignment or "program"

    def _end(self, job: JobInfo, t: float, wall: float, reason: str, parts: int | None,
             basis: str = OBSERVED, note: str | None = None) -> None:
        self.open = None
        if t == job.start:
            # Begun and ended at one instant: no time, no energy, not a job. It is what an
            # instant seen in two halves leaves (a server that writes the nodes of a job's end
            # one by one, read between them: the parts counter and job id of after the end,
            # the active state of before it, then the idle state at the same instant).
            log.info("%s: %s %s began and ended at the same instant (%s); not a job, not recorded",
                     self.machine, job.key_point, job.key, reason)
        else:
            if parts is not None and job.parts_start is not None:
                n = parts - job.parts_start
                made = n if n >= 0 else None
            else:
                made = None
            self.ending.append(_Ending("job", job.start, job.start_wall, t, wall, reason, t + self.close_timeout_s,
                                       info=job, parts=made, end_basis=basis, end_note=note))
            if self.on_ending is not None:
                self.on_ending()
        self.interval = _Interval("idle", t, wall, parts_start=parts)

    def _close_interval(self, t: float, wall: float, reason: str | None, parts_end: int | None = None) -> None:
        """End the open interval at t (nothing when it has no length)."""
        iv = self.interval
        self.interval = None
        if iv is None or t <= iv.start:
            return
        if parts_end is None and iv.kind == "idle":
            parts_end = self.parts  # observed: the counter is current
        parts = (parts_end - iv.parts_start if parts_end is not None and iv.parts_start is not None
                 and parts_end >= iv.parts_start else None)
        why = iv.reason if iv.kind == "unobserved" else reason
        self.ending.append(_Ending(iv.kind, iv.start, iv.start_wall, t, wall, why, t + self.close_timeout_s,
                                   parts=parts, flags=set(iv.flags)))
        if self.on_ending is not None:
            self.on_ending()

    # ------------------------------------------------------------------------ finishing

    def tick(self, now: float) -> None:
        """Called periodically: settles long outages, cuts long intervals, finishes spans whose
        wait for a meter sample has timed out."""
        if self.outage is not None and not self.outage.settled and now - self.outage.t > self.outage_close_s:
            self._settle_outage(now)
        self._tick_periods(now)
        self._finish_due(now)

    def _tick_periods(self, now: float) -> None:
        """Cut an interval that has lasted ``interval_s`` (at multiples of it since the epoch, in
        wall time), so that idle and unobserved time is recorded regularly."""
        iv = self.interval
        if iv is None or self._wall_offset is None or (iv.kind == "idle" and not self.observed):
            return
        while True:
            cut_wall = (math.floor(iv.start_wall / self.interval_s) + 1) * self.interval_s
            cut = self._mono(cut_wall)
            if cut > now or cut <= iv.start:
                return
            self._close_interval(cut, cut_wall, "period")
            # An unobserved stretch's parts are known only when it ends: the piece that ends it
            # carries the count since the stretch began.
            carried = self.parts if iv.kind == "idle" else iv.parts_start
            self.interval = iv = _Interval(iv.kind, cut, cut_wall, reason=iv.reason, parts_start=carried,
                                           flags=set(iv.flags) & {"counter_stale", "meter_unavailable"})

    def _finish_due(self, now: float) -> None:
        if not self.ending:
            if self._oldest_start() is None or len(self.samples) > 64 or len(self.bad_times) > 64:
                self._trim()
            return
        last = self.samples.last_t
        done = [e for e in self.ending if last >= e.end or now >= e.deadline]
        if not done:
            return
        for e in done:
            self.ending.remove(e)
            if last < e.end:
                e.flags.add("no_meter_sample_after_end")
            pending = self._pending(e)
            if self.compute is None:
                self.on_finished(pending)
            else:
                self.on_finished(pending.finish(self.compute(*pending.inputs.args())))
        self._trim()

    def _pending(self, e: _Ending) -> Pending:
        """The span with a copy of what its energy is computed from (the buffers are reused)."""
        t, en, p = self.samples.view()
        st_t, st_s = self.timeline.view()
        if len(st_t) == 0:
            st_t, st_s = np.array([e.start]), np.array([states.code("ready")], np.uint8)
        lo, hi = np.searchsorted(t, e.start, "left"), np.searchsorted(t, e.end, "right")
        inside = t[lo:hi]
        median = float(np.median(np.diff(inside))) if len(inside) > 1 else None
        bad = sum(1 for b in self.bad_times if e.start <= b <= e.end)
        own = e.info.flags if e.info is not None else e.flags
        own |= e.flags
        inputs = capture(t, en, p, st_t, st_s, e.start, e.end, self.max_gap_s, self.rollover_kwh,
                         self.max_power_w, self.bad_times, own)
        return Pending(self.machine, e, inputs, int(hi - lo), bad, median)

    def _oldest_start(self) -> float | None:
        starts = [e.start for e in self.ending]
        if self.open is not None:
            starts.append(self.open.start)
        if self.interval is not None:
            starts.append(self.interval.start)
        return min(starts) if starts else None

    def _trim(self) -> None:
        oldest = self._oldest_start()
        keep = self.samples.last_t - self.lookback_s if oldest is None else min(oldest, self.samples.last_t)
        self.samples.trim_before(keep)
        # The state timeline must cover the first kept sample too (it may lie before ``keep``):
        # the kernel needs the state at the start of the interval that contains a span's start.
        first = float(self.samples.t[0]) if len(self.samples) else keep
        self.timeline.trim_before(min(keep, first))
        while self.bad_times and self.bad_times[0] < keep:
            self.bad_times.popleft()

    # ------------------------------------------------------------------------ checkpoints

    def checkpoint(self, wall_of: Callable[[float], float]) -> tuple[str | None, list[tuple[float, float, float]],
                                                                       float] | None:
        """What to store so that a restarted agent can resume this machine's open spans.

        Returns None when nothing changed since the last checkpoint; else (body, new samples,
        keep_from): ``body`` the JSON of the open job or interval, the spans waiting to finish,
        the state timeline and the last CNC values (None when nothing is open: forget the
        stored one), the samples taken since the last checkpoint as (wall t, e, p), and the
        wall time before which stored samples are not needed any more. ``wall_of`` maps
        monotonic to wall seconds. Times are stored as wall time because the monotonic clock
        starts anew with the process.
        """
        t, e, p = self.samples.view()
        if self.open is None and self.interval is None and not self.ending:
            if not self._ckpt_stored:
                return None
            self._ckpt_stored = False
            self._ckpt_t = -math.inf
            return None, [], 0.0
        new = np.searchsorted(t, self._ckpt_t, side="right")
        rows = [(wall_of(float(t[k])), float(e[k]), float(p[k])) for k in range(int(new), len(t))]
        st_t, st_s = self.timeline.view()

        def job(info: JobInfo) -> dict[str, Any]:
            d = {k: getattr(info, k) for k in ("key", "key_point", "job_id", "program", "product", "serial",
                                               "subassembly", "assignment", "parts_start", "start_basis",
                                               "start_reason")}
            return {**d, "start": wall_of(info.start), "start_wall": info.start_wall, "flags": sorted(info.flags)}

        def interval(iv: _Interval) -> dict[str, Any]:
            return {"kind": iv.kind, "start": wall_of(iv.start), "start_wall": iv.start_wall, "reason": iv.reason,
                    "parts_start": iv.parts_start, "flags": sorted(iv.flags)}

        def ending(x: _Ending) -> dict[str, Any]:
            return {"kind": x.kind, "start": wall_of(x.start), "start_wall": x.start_wall, "end": wall_of(x.end),
                    "end_wall": x.end_wall, "reason": x.reason, "parts": x.parts, "end_basis": x.end_basis,
                    "end_note": x.end_note, "flags": sorted(x.flags),
                    "info": None if x.info is None else job(x.info)}

        body = {
            "version": 2,
            "open": None if self.open is None else job(self.open),
            "interval": None if self.interval is None else interval(self.interval),
            "ending": [ending(x) for x in self.ending],
            "timeline": [[wall_of(float(a)), int(b)] for a, b in zip(st_t, st_s)],
            "bad_times": [wall_of(b) for b in self.bad_times],
            "parts": self.parts,
            "cnc_values": self.cnc_values,
            "stamps": self._stamps,
            "last_wall": wall_of(float(t[-1])) if len(t) else None,
        }
        if len(t):
            self._ckpt_t = float(t[-1])
        self._ckpt_stored = True
        try:
            text = json.dumps(body)
        except (TypeError, ValueError):  # a CNC value JSON cannot hold: keep the rest
            body["cnc_values"] = {k: v for k, v in self.cnc_values.items() if isinstance(v, (str, int, float, bool))}
            text = json.dumps(body)
        return text, rows, wall_of(float(t[0])) if len(t) else 0.0

    def restore(self, body: dict[str, Any], rows: list[tuple[float, float, float]], mono_of: Callable[[float], float],
                now: float) -> None:
        """Resume from a checkpoint written by a previous run (``mono_of`` maps wall to
        monotonic seconds of this run). The time the agent was not running is an outage
        (reason ``agent_not_running``) from the newest checkpointed instant: the CNC's first
        snapshot decides, as after any outage, whether the open job or interval went on
        (flagged ``resumed_after_restart``) or ended."""
        if body.get("version") != 2:
            raise ValueError(f"checkpoint format {body.get('version', 1)} is not this version's (2)")

        def job(d: dict[str, Any]) -> JobInfo:
            return JobInfo(key=d["key"], key_point=d["key_point"], start=mono_of(d["start"]),
                           start_wall=d["start_wall"], job_id=d["job_id"], program=d["program"],
                           product=d["product"], serial=d["serial"], subassembly=d["subassembly"],
                           assignment=d["assignment"], parts_start=d["parts_start"], flags=set(d["flags"]) | {"resumed_after_restart"},
                           start_basis=d["start_basis"], start_reason=d["start_reason"])

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
        self.cnc_values = dict(body.get("cnc_values") or {})
        self._stamps = {str(q): float(s) for q, s in (body.get("stamps") or {}).items()}
        self.cnc_state = self.rules.state_of(self.cnc_values) if self.cnc_values else None
        if body.get("open"):
            self.open = job(body["open"])
        if body.get("interval"):
            d = body["interval"]
            self.interval = _Interval(d["kind"], mono_of(d["start"]), d["start_wall"], d["reason"], d["parts_start"],
                                      set(d["flags"]) | {"resumed_after_restart"})
        for x in body.get("ending", []):
            end = mono_of(x["end"])
            self.ending.append(_Ending(x["kind"], mono_of(x["start"]), x["start_wall"], end, x["end_wall"],
                                       x["reason"], max(end, now) + self.close_timeout_s,
                                       info=None if x["info"] is None else job(x["info"]), parts=x["parts"],
                                       end_basis=x["end_basis"], end_note=x["end_note"], flags=set(x["flags"])))
        last_wall = body.get("last_wall")
        if self.open is not None or self.interval is not None:
            self.seen_cnc = True
            since = last_wall if last_wall is not None else max(
                [self.open.start_wall] if self.open else [self.interval.start_wall] if self.interval else [0.0])
            self.outage = _Outage(mono_of(since), since, "agent_not_running", dict(self.cnc_values), self.parts,
                                  dict(self._stamps))
        self._ckpt_t = self.samples.last_t
        self._ckpt_stored = True
