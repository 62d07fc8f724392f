"""Scenarios: machines, their jobs and power, on one clock, with closed-form energy.

Each machine follows a piecewise-constant operating-state timeline: its idle state before,
between and after jobs, and each job's phases (setup, processing, interrupted) in order.
Power in state s is ``P_s (1 + a sin(2 pi t / T + phi))`` (ripple ``a``, period ``T``), so the
energy between any two instants has a closed form; the meter's energy register is
``offset + E(t)`` with ``E(0) = 0`` (negative before the scenario's time zero). ``truth``
gives every job's exact energy, total and by state. Faults change what the devices *report*,
never the physical energy, so truth is unaffected by them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import ConfigError
from agent.states import STATES
from drivers.profile import format_validation

JOB_STATES = ("setup", "processing", "interrupted")
FAULT_KINDS = ("meter_silent", "modbus_exception", "counter_reset", "power_nan")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ripple(_M):
    amplitude: float = Field(0.0, ge=0.0, le=0.5, description="relative ripple of power")
    period_s: float = Field(60.0, gt=0)
    phase: float = 0.0


class MeterSim(_M):
    unit_id: int = Field(ge=1, le=247)
    profile: str
    energy_offset_kwh: float = Field(0.0, ge=0)
    ripple: Ripple = Field(default_factory=Ripple)


class CncSim(_M):
    node_map: str = "opc40502"
    channel: str
    job: str


class JobSpec(_M):
    job_id: str
    program: str
    product: str | None = None
    serial: str | None = None
    subassembly: str | None = None
    parts: int = Field(1, ge=0)
    start_s: float
    phases: list[tuple[str, float]]

    @model_validator(mode="after")
    def _phases(self) -> "JobSpec":
        if not self.phases:
            raise ValueError("a job needs at least one phase")
        for i, (state, dur) in enumerate(self.phases):
            if state not in JOB_STATES:
                raise ValueError(f"phases[{i}]: {state!r} is not a job state ({', '.join(JOB_STATES)})")
            if not dur > 0:
                raise ValueError(f"phases[{i}]: duration must be > 0")
        return self

    @property
    def end_s(self) -> float:
        return self.start_s + sum(d for _, d in self.phases)


class MachineSim(_M):
    id: str
    meter: MeterSim
    cnc: CncSim
    power_w: dict[str, float]
    idle_state: Literal["off", "standby", "ready"] = "ready"
    jobs: list[JobSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "MachineSim":
        for s, p in self.power_w.items():
            if s not in STATES:
                raise ValueError(f"power_w: unknown state {s!r} (known: {', '.join(STATES)})")
            if p < 0:
                raise ValueError(f"power_w.{s}: must be >= 0")
        used = {self.idle_state} | {s for j in self.jobs for s, _ in j.phases}
        missing = sorted(used - set(self.power_w))
        if missing:
            raise ValueError(f"power_w: no power for states {missing}")
        for k in range(1, len(self.jobs)):
            prev, job = self.jobs[k - 1], self.jobs[k]
            if job.start_s < prev.end_s:
                raise ValueError(f"jobs[{k}].start_s: {job.job_id} starts at {job.start_s:g} s, "
                                 f"before job {prev.job_id} ends at {prev.end_s:g} s")
        return self


class Fault(_M):
    machine: str
    kind: Literal["meter_silent", "modbus_exception", "counter_reset", "power_nan"]
    from_s: float
    to_s: float | None = Field(None, description="end of the fault (exclusive); counter_reset needs none")

    @model_validator(mode="after")
    def _span(self) -> "Fault":
        if self.kind != "counter_reset" and (self.to_s is None or self.to_s <= self.from_s):
            raise ValueError(f"{self.kind} needs to_s after from_s")
        return self

    def active(self, t: float) -> bool:
        return self.from_s <= t and (self.to_s is None or t < self.to_s)


class Scenario(_M):
    name: str
    speed: float = Field(1.0, gt=0, le=1000)
    duration_s: float = Field(gt=0)
    namespace: str = "urn:energy-agent:sim"
    machines: list[MachineSim]
    faults: list[Fault] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "Scenario":
        ids, units = set(), set()
        for i, m in enumerate(self.machines):
            if m.id in ids:
                raise ValueError(f"machines[{i}].id: duplicate machine {m.id!r}")
            if m.meter.unit_id in units:
                raise ValueError(f"machines[{i}].meter.unit_id: unit {m.meter.unit_id} already used")
            ids.add(m.id)
            units.add(m.meter.unit_id)
        for i, f in enumerate(self.faults):
            if f.machine not in ids:
                raise ValueError(f"faults[{i}].machine: unknown machine {f.machine!r}")
        return self

    @cached_property
    def timelines(self) -> dict[str, "Timeline"]:
        return {m.id: Timeline(m) for m in self.machines}


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    state: str
    job: int | None  # index into machine.jobs


class Timeline:
    """A machine's states over all time, with closed-form power and energy."""

    def __init__(self, machine: MachineSim):
        self.m = machine
        r = machine.meter.ripple
        self.a, self.w, self.phi = r.amplitude, 2 * math.pi / r.period_s, r.phase
        segs: list[Segment] = []
        t = -math.inf
        for k, job in enumerate(machine.jobs):
            if job.start_s > t:
                segs.append(Segment(t, job.start_s, machine.idle_state, None))
            t = job.start_s
            for state, dur in job.phases:
                segs.append(Segment(t, t + dur, state, k))
                t += dur
        segs.append(Segment(t, math.inf, machine.idle_state, None))
        self.segments = segs
        self.starts = [s.start for s in segs]

    def segment_at(self, t: float) -> Segment:
        return self.segments[bisect.bisect_right(self.starts, t) - 1]

    def power_at(self, t: float) -> float:
        p = self.m.power_w[self.segment_at(t).state]
        return p * (1.0 + self.a * math.sin(self.w * t + self.phi))

    def _integral_ws(self, state: str, a: float, b: float) -> float:
        """Exact integral of power in ``state`` over [a, b], in W s."""
        p = self.m.power_w[state]
        if p == 0.0 or b <= a:
            return 0.0
        ripple = 0.0
        if self.a:
            ripple = -self.a / self.w * (math.cos(self.w * b + self.phi) - math.cos(self.w * a + self.phi))
        return p * ((b - a) + ripple)

    def energy_ws(self, a: float, b: float) -> dict[str, float]:
        """Energy over [a, b] by state (W s)."""
        out = {s: 0.0 for s in STATES}
        i = bisect.bisect_right(self.starts, a) - 1
        while i < len(self.segments) and self.segments[i].start < b:
            s = self.segments[i]
            out[s.state] += self._integral_ws(s.state, max(a, s.start), min(b, s.end))
            i += 1
        return out

    def counter_kwh(self, t: float) -> float:
        """The meter's (unfaulted) energy register: offset + integral from 0 to t."""
        e = sum(self.energy_ws(0.0, t).values()) if t >= 0 else -sum(self.energy_ws(t, 0.0).values())
        return self.m.meter.energy_offset_kwh + e / 3.6e6

    def last_change(self, t: float) -> float | None:
        """When the values shown at t were set (None: unchanged since the beginning of time)."""
        start = self.segment_at(t).start
        return start if math.isfinite(start) else None

    def change_times(self, a: float, b: float) -> list[float]:
        """State/job boundaries in (a, b]."""
        return [s.start for s in self.segments if a < s.start <= b]

    def cnc_values(self, t: float) -> dict[str, object]:
        """What the CNC shows at t (raw OPC 40502-style values)."""
        seg = self.segment_at(t)
        done = [j for j in self.m.jobs if j.end_s <= t]
        current = self.m.jobs[seg.job] if seg.job is not None else None
        shown = current or (done[-1] if done else None)
        status = {"processing": (0, 1, 0), "setup": (0, 0, 2), "interrupted": (1, 3, 0)}.get(seg.state, (2, 0, 0))
        return {
            "channel_status": status[0], "program_status": status[1], "operation_mode": status[2],
            "program": shown.program if shown else "",
            "job_id": current.job_id if current else "",
            "parts_total": sum(j.parts for j in done),
            "product": (shown.product or "") if shown else "",
            "serial": (shown.serial or "") if shown else "",
            "subassembly": (shown.subassembly or "") if shown else "",
        }


def load(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{p}: {format_validation(exc)}") from None


def truth(scenario: Scenario) -> list[dict]:
    """Every job's exact energy (kWh, total and by state) and the counter value at its end."""
    out = []
    for m in scenario.machines:
        tl = scenario.timelines[m.id]
        for job in m.jobs:
            by_state = {s: ws / 3.6e6 for s, ws in tl.energy_ws(job.start_s, job.end_s).items()}
            out.append({
                "machine": m.id, "job_id": job.job_id, "program": job.program, "product": job.product,
                "serial": job.serial, "subassembly": job.subassembly, "parts": job.parts,
                "start_s": job.start_s, "end_s": job.end_s, "kwh": sum(by_state.values()), "by_state": by_state,
                "counter_end_kwh": tl.counter_kwh(job.end_s),
            })
    return out
