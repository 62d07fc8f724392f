"""Scenarios: machines, their jobs and power on one clock, with closed-form energy.

Each machine follows a piecewise-constant operating-state timeline: its idle state before,
between and after jobs, and each job's phases (setup, processing, interrupted) in order.
Power in state s is ``P_s (1 + a sin(2 pi t / T + phi))`` (ripple amplitude ``a``, period ``T``,
phase ``phi``; zero where ``P_s`` is zero), so the energy between any two instants has a closed
form. The meter's energy register is ``E(t) = offset + integral of P from 0 to t`` (kWh; negative
integral before scenario time 0, so a scenario may be served before its anchor).

``truth`` gives every job's exact energy, total and by state. Faults change what the devices
*report*, never the physical energy, so the energy in the truth is unaffected by them; each job
also lists the faults that touch its window (with the true energy inside each), so a test knows
which part of a job was reported wrongly and which part must still be exact.

The helpers ``state_at``, ``power_at``, ``energy_at`` (and the :class:`Timeline` methods behind
them) take a scalar or a numpy array of scenario times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from energy_agent.core.errors import ConfigError
from energy_agent.core.states import CODE, STATES
from energy_agent.core.validation import format_validation
from energy_agent.drivers.nodemap import NodeMap, load_nodemap
from energy_agent.drivers.profile import MeterProfile, load_profile

JOB_STATES = ("setup", "processing", "interrupted")
IDLE_STATES = ("off", "standby", "ready")
J_PER_KWH = 3.6e6


# ------------------------------------------------------------------------------------ faults


@dataclass(frozen=True)
class FaultKind:
    """What a fault kind acts on and which of ``to_s`` it takes."""

    device: Literal["meter", "cnc", "server"]
    to_s: Literal["required", "forbidden", "optional"]
    effect: str
    takes: tuple[str, ...] = ()
    """Optional fields of :class:`Fault` this kind accepts (``code``, ``point``, ...)."""
    shared: bool = False
    """Acts on the connection the named machine's meter is served on, so on every meter served
    there (the truth lists it for all of them)."""


FAULT_KINDS: dict[str, FaultKind] = {
    # Adding a kind: an entry here (validation, docs), its effect in the device's fault hook
    # (``energy_agent.simulators.meter.apply_faults`` for meters; ``energy_agent.simulators.cnc.cnc_events`` for CNCs,
    # where a fault's start and end become events of the published timeline).
    "meter_silent": FaultKind("meter", "required",
                              "the meter does not answer in [from_s, to_s): requests time out"),
    "modbus_exception": FaultKind("meter", "required",
                                  "the meter answers with an exception response (code 4, device failure, "
                                  "unless `code` says otherwise) in [from_s, to_s)", ("code",)),
    "modbus_garbled": FaultKind("meter", "required",
                                "the meter's responses are damaged on the wire in [from_s, to_s) (served through "
                                "a corrupting proxy, TCP ports only): `mode` corrupt (default; RTU-over-TCP: a wrong "
                                "CRC, TCP: the MBAP length announces one byte more than is sent) or short (a "
                                "well-formed response carrying half the registers asked for)", ("mode",)),
    "counter_reset": FaultKind("meter", "forbidden",
                               "at from_s the energy register restarts from 0: it shows E(t) - E(from_s) from then on"),
    "counter_jump": FaultKind("meter", "optional",
                              "the energy register shows E(t) + `kwh` (negative: backwards) from from_s, until "
                              "to_s when given (a glitch: it jumps back at to_s)", ("kwh",)),
    "counter_freeze": FaultKind("meter", "required",
                                "the energy register holds the value it showed at from_s in [from_s, to_s) while "
                                "power keeps reading; at to_s it shows E(t) again (the meter kept counting inside)"),
    "listener_down": FaultKind("meter", "required",
                               "the Modbus TCP listener closes at from_s, dropping every open connection (new ones "
                               "are refused), and reopens on the same port at to_s; every meter served on that "
                               "port is gone meanwhile (TCP ports only)", shared=True),
    "counter_nan": FaultKind("meter", "required",
                             "the energy register reads NaN in [from_s, to_s) (integer registers: 'not available')"),
    "power_nan": FaultKind("meter", "required",
                           "the power register reads NaN in [from_s, to_s) (integer registers: the type's "
                           "'not available' value, 0x8000… signed or 0xFFFF… unsigned); currents too"),
    "power_inf": FaultKind("meter", "required",
                           "the power register reads +Inf in [from_s, to_s) (integer registers: 'not available'); "
                           "currents too"),
    "power_negative": FaultKind("meter", "required",
                                "the power register reads -P(t) in [from_s, to_s) (a reversed CT or sign error); "
                                "the energy register is unaffected"),
    "power_implausible": FaultKind("meter", "required",
                                   "the power register reads `value_w` (default: twice the profile's max_power_w) "
                                   "in [from_s, to_s); the energy register is unaffected", ("value_w",)),
    "cnc_bad_status": FaultKind("cnc", "required",
                                "the CNC sends `point` (default: every point) with StatusCode `status` (default "
                                "BadSensorFailure) in [from_s, to_s), the last value it showed before inside: with "
                                "a Bad status it must not be used, with an Uncertain one it is the last usable value",
                                ("point", "status")),
    "cnc_restart": FaultKind("cnc", "required",
                             "the OPC UA server stops at from_s (every session is closed) and starts again at "
                             "to_s with its CNC namespace at another index; its values are those of to_s, each "
                             "with the SourceTimestamp of its last change (what happened meanwhile happened). "
                             "One server serves every CNC of the scenario, so every machine's CNC goes", shared=True),
}
GARBLE_MODES = ("corrupt", "short")

MODBUS_EXCEPTION_CODES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11)


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fault(_M):
    machine: str
    kind: str = Field(description=f"one of {', '.join(FAULT_KINDS)}")
    from_s: float
    to_s: float | None = Field(None, description="end of the fault (exclusive); counter_reset takes none")
    code: int | None = Field(None, description="modbus_exception: the exception code (default 4)")
    point: str | None = Field(None, description="cnc_bad_status: the node map point (default: every point)")
    mode: Literal["corrupt", "short"] | None = Field(None, description="modbus_garbled: how (default corrupt)")
    kwh: float | None = Field(None, description="counter_jump: the step of the energy register (kWh, != 0)")
    value_w: float | None = Field(None, description="power_implausible: the power shown (W; default 2 x max_power_w)")
    status: Literal["BadSensorFailure", "BadCommunicationError", "BadOutOfService",
                    "UncertainLastUsableValue"] | None = Field(
        None, description="cnc_bad_status: the StatusCode sent (default BadSensorFailure)")

    @model_validator(mode="after")
    def _check(self) -> Fault:
        kind = FAULT_KINDS.get(self.kind)
        if kind is None:
            raise ValueError(f"kind: unknown fault kind {self.kind!r} (known: {', '.join(FAULT_KINDS)})")
        if kind.to_s == "required" and self.to_s is None:
            raise ValueError(f"to_s: {self.kind} needs an end (to_s)")
        if kind.to_s == "forbidden" and self.to_s is not None:
            raise ValueError(f"to_s: {self.kind} happens at from_s and takes no to_s")
        for name in ("code", "point", "mode", "kwh", "value_w", "status"):
            if getattr(self, name) is not None and name not in kind.takes:
                owners = ", ".join(k for k, v in FAULT_KINDS.items() if name in v.takes)
                raise ValueError(f"{name}: only {owners} takes a {name}, not {self.kind}")
        if self.kind == "counter_jump" and not (self.kwh is not None and self.kwh != 0 and math.isfinite(self.kwh)):
            raise ValueError("kwh: counter_jump needs a finite, non-zero step (kwh)")
        if self.value_w is not None and not math.isfinite(self.value_w):
            raise ValueError(f"value_w: {self.value_w} is not a finite power")
        if self.to_s is not None and not self.to_s > self.from_s:
            raise ValueError(f"to_s: {self.to_s:g} is not after from_s {self.from_s:g}")
        if self.code is not None:
            if self.code not in MODBUS_EXCEPTION_CODES:
                raise ValueError(f"code: {self.code} is not a Modbus exception code "
                                 f"({', '.join(map(str, MODBUS_EXCEPTION_CODES))})")
        return self

    @property
    def device(self) -> str:
        return FAULT_KINDS[self.kind].device

    def active(self, t: float) -> bool:
        """Whether the fault holds at scenario time t ([from_s, to_s), or from from_s on)."""
        return self.from_s <= t and (self.to_s is None or t < self.to_s)

    def touches(self, a: float, b: float) -> tuple[float, float] | None:
        """The part of [a, b) where this fault shows, or None. A fault without ``to_s`` (a
        counter event) shows only at the instant it happens; after it the register counts
        normally again, so only the window holding ``from_s`` sees it."""
        if self.to_s is None:
            return (self.from_s, self.from_s) if a <= self.from_s < b else None
        lo, hi = max(a, self.from_s), min(b, self.to_s)
        if lo < hi:
            return (lo, hi)
        # A glitch or a freeze that ends inside the window: the register steps back to E(t) at to_s.
        return (self.to_s, self.to_s) if self.kind in ("counter_jump", "counter_freeze") and a <= self.to_s < b else None


# ------------------------------------------------------------------------------------ scenario


def _ref(ref: str, info: ValidationInfo) -> str:
    """A profile/node map reference; a relative .yaml path is taken relative to the scenario file."""
    base = (info.context or {}).get("base")
    p = Path(ref)
    if base is not None and p.suffix in (".yaml", ".yml") and not p.is_absolute():
        return str(Path(base) / p)
    return ref


class Ripple(_M):
    amplitude: float = Field(0.0, ge=0.0, lt=1.0, description="relative ripple of power")
    period_s: float = Field(60.0, gt=0)
    phase: float = Field(0.0, description="radians")


def _loadable(ref: str, info: ValidationInfo, loader) -> str:
    """A profile or node map reference (resolved against the scenario file) that loads."""
    ref = _ref(ref, info)
    try:
        loader(ref)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    return ref


class MeterSim(_M):
    unit_id: int = Field(ge=1, le=247)
    profile: str = Field(description="built-in profile name or path to a profile .yaml")
    energy_offset_kwh: float = Field(0.0, ge=0, description="register value at scenario time 0")
    ripple: Ripple = Field(default_factory=Ripple)
    strict: bool = Field(False, description=(
        "answer exception 2 (illegal data address) to any read touching a register no point of the profile "
        "maps, as Eastron SDM meters do; false: such registers read as whatever the block holds"))

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str, info: ValidationInfo) -> str:
        return _loadable(v, info, load_profile)

    @cached_property
    def profile_model(self) -> MeterProfile:
        return load_profile(self.profile)


class CncSim(_M):
    node_map: str = Field("opc40502", description="built-in node map name or path to a node map .yaml")
    channel: str = Field(description="node map param 'channel' (string node id prefix of the channel)")
    job: str = Field(description="node map param 'job' (string node id prefix of the production job)")

    @field_validator("node_map")
    @classmethod
    def _node_map(cls, v: str, info: ValidationInfo) -> str:
        return _loadable(v, info, load_nodemap)

    @cached_property
    def node_map_model(self) -> NodeMap:
        return load_nodemap(self.node_map)


class JobSpec(_M):
    job_id: str = Field(min_length=1)
    program: str = Field(min_length=1)
    product: str | None = None
    serial: str | None = None
    subassembly: str | None = None
    parts: int = Field(1, ge=0)
    start_s: float
    phases: list[tuple[str, float]] = Field(description="[[state, duration_s], ...] in order")

    @model_validator(mode="after")
    def _phases(self) -> JobSpec:
        if not self.phases:
            raise ValueError("phases: a job needs at least one phase")
        for i, (state, dur) in enumerate(self.phases):
            if state not in STATES:
                raise ValueError(f"phases[{i}]: {state!r} is not an operating state ({', '.join(STATES)})")
            if state not in JOB_STATES:
                raise ValueError(f"phases[{i}]: {state!r} is not a job state ({', '.join(JOB_STATES)})")
            if not (dur > 0 and math.isfinite(dur)):
                raise ValueError(f"phases[{i}]: duration {dur:g} must be > 0")
        return self

    @property
    def duration_s(self) -> float:
        return sum(d for _, d in self.phases)

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


class MachineSim(_M):
    id: str = Field(min_length=1)
    meter: MeterSim
    cnc: CncSim
    power_w: dict[str, float] = Field(description="power per operating state (W), for the states it uses")
    idle_state: Literal["off", "standby", "ready"] = Field("ready", description="state before, between, after jobs")
    jobs: list[JobSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> MachineSim:
        for s, p in self.power_w.items():
            if s not in STATES:
                raise ValueError(f"power_w: unknown state {s!r} (known: {', '.join(STATES)})")
            if not (p >= 0 and math.isfinite(p)):
                raise ValueError(f"power_w.{s}: {p:g} must be >= 0")
        used = {self.idle_state} | {s for j in self.jobs for s, _ in j.phases}
        missing = [s for s in STATES if s in used and s not in self.power_w]
        if missing:
            raise ValueError(f"power_w: no power for states {', '.join(missing)}")
        seen: dict[str, int] = {}
        for k, job in enumerate(self.jobs):
            if job.job_id in seen:
                raise ValueError(f"jobs[{k}].job_id: {job.job_id!r} already used by jobs[{seen[job.job_id]}]")
            seen[job.job_id] = k
        order = sorted(range(len(self.jobs)), key=lambda k: (self.jobs[k].start_s, k))
        for prev, k in zip(order, order[1:]):
            a, b = self.jobs[prev], self.jobs[k]
            if b.start_s < a.end_s:
                raise ValueError(f"jobs[{k}].start_s: overlaps job {a.job_id} ({b.job_id} starts at {b.start_s:g} s, "
                                 f"{a.job_id} runs {a.start_s:g} to {a.end_s:g} s)")
        return self

    @cached_property
    def timeline(self) -> Timeline:
        return Timeline(self)


class Scenario(_M):
    name: str
    speed: float = Field(1.0, gt=0, le=10_000, description="scenario seconds per real second")
    duration_s: float = Field(gt=0, description="scenario end, scenario seconds after the anchor")
    namespace: str = Field("urn:energy-agent:sim", min_length=1, description="OPC UA namespace URI of the CNC nodes")
    machines: list[MachineSim] = Field(min_length=1)
    faults: list[Fault] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Scenario:
        ids: dict[str, int] = {}
        units: dict[int, int] = {}
        for i, m in enumerate(self.machines):
            if m.id in ids:
                raise ValueError(f"machines[{i}].id: duplicate machine {m.id!r} (also machines[{ids[m.id]}])")
            if m.meter.unit_id in units:
                raise ValueError(f"machines[{i}].meter.unit_id: unit {m.meter.unit_id} already used by "
                                 f"machines[{units[m.meter.unit_id]}]")
            ids[m.id] = i
            units[m.meter.unit_id] = i
            for k, job in enumerate(m.jobs):
                if job.end_s > self.duration_s:
                    raise ValueError(f"machines[{i}].jobs[{k}].start_s: job {job.job_id} ends at {job.end_s:g} s, "
                                     f"after the scenario (duration_s {self.duration_s:g})")
        for i, f in enumerate(self.faults):
            if f.machine not in ids:
                raise ValueError(f"faults[{i}].machine: unknown machine {f.machine!r} (known: {', '.join(ids)})")
            if f.kind == "power_implausible" and f.value_w is None:
                prof = self.machines[ids[f.machine]].meter.profile_model
                if not prof.max_power_w:
                    raise ValueError(f"faults[{i}].value_w: profile {prof.name} of {f.machine} has no max_power_w; "
                                     "give the power to show")
        return self

    def machine(self, machine_id: str) -> MachineSim:
        for m in self.machines:
            if m.id == machine_id:
                return m
        raise KeyError(machine_id)

    @property
    def timelines(self) -> dict[str, Timeline]:
        return {m.id: m.timeline for m in self.machines}

    def faults_of(self, machine_id: str, device: str | None = None) -> list[Fault]:
        """The faults of one machine (optionally of one device), in order of from_s."""
        return sorted((f for f in self.faults if f.machine == machine_id and (device is None or f.device == device)),
                      key=lambda f: f.from_s)

    def with_faults(self, faults: list[dict[str, Any] | Fault]) -> Scenario:
        """A copy of this scenario with other faults (validated)."""
        data = self.model_dump()
        data["faults"] = [f.model_dump() if isinstance(f, Fault) else f for f in faults]
        return Scenario.model_validate(data)

    def with_speed(self, speed: float) -> Scenario:
        data = self.model_dump()
        data["speed"] = speed
        return Scenario.model_validate(data)


# ------------------------------------------------------------------------------------ timeline


class Timeline:
    """A machine's states over all time, with closed-form power and energy.

    Segments ``[starts[k], starts[k+1])`` of constant state (the first from -inf, the last to
    +inf); a boundary belongs to the segment it starts (values are right-continuous). Methods
    taking ``t`` accept a float or a numpy array.
    """

    def __init__(self, machine: MachineSim):
        self.machine = machine
        r = machine.meter.ripple
        self.a, self.w, self.phi = r.amplitude, 2 * math.pi / r.period_s, r.phase
        self.order = sorted(range(len(machine.jobs)), key=lambda k: machine.jobs[k].start_s)
        starts, states, jobs = [-math.inf], [machine.idle_state], [-1]
        for k in self.order:
            job = machine.jobs[k]
            t = job.start_s
            for state, dur in job.phases:
                starts.append(t)
                states.append(state)
                jobs.append(k)
                t += dur
            starts.append(t)  # idle after the job (dropped below when the next one starts at once)
            states.append(machine.idle_state)
            jobs.append(-1)
        keep = [i for i in range(len(starts)) if i + 1 == len(starts) or starts[i + 1] != starts[i]]
        starts, states, jobs = [starts[i] for i in keep], [states[i] for i in keep], [jobs[i] for i in keep]
        self.starts = np.array(starts, dtype=float)
        self.ends = np.append(self.starts[1:], math.inf)
        self.states = tuple(states)
        self.codes = np.array([CODE[s] for s in states], dtype=np.uint8)
        self.jobs = np.array(jobs, dtype=np.int64)
        self.p = np.array([machine.power_w[s] for s in states], dtype=float)
        self.bounds = self.starts[1:]
        # Each segment's reference point (its start; for the first, the first boundary or 0) and
        # the integral of power from the first boundary to it: R(ref_k).
        self.ref = self.starts.copy()
        self.ref[0] = self.bounds[0] if len(self.bounds) else 0.0
        c = np.zeros(len(self.starts))
        for k in range(1, len(self.starts) - 1):
            c[k + 1] = c[k] + self._seg_ws(k, self.starts[k], self.starts[k + 1])
        self.c = c
        self.r0 = float(self._r(0.0))

    # -------------------------------------------------------------- closed form

    def _antiderivative(self, k, t):
        """W s: P_k (t - a/w cos(w t + phi)), a primitive of the power in segment k."""
        if self.a:
            return self.p[k] * (t - self.a / self.w * np.cos(self.w * t + self.phi))
        return self.p[k] * t

    def _seg_ws(self, k: int, a: float, b: float) -> float:
        """Exact energy of segment k's state over [a, b] (inside the segment), W s."""
        p = float(self.p[k])
        if p == 0.0 or b <= a:
            return 0.0
        ripple = 0.0
        if self.a:
            ripple = -self.a / self.w * (math.cos(self.w * b + self.phi) - math.cos(self.w * a + self.phi))
        return float(p * ((b - a) + ripple))

    def _r(self, t):
        """Integral of power from the first boundary to t (W s), closed form, vectorised."""
        k = np.searchsorted(self.bounds, t, side="right")
        return self.c[k] + self._antiderivative(k, t) - self._antiderivative(k, self.ref[k])

    # -------------------------------------------------------------- public

    def segment_index(self, t):
        return np.searchsorted(self.bounds, t, side="right")

    def state_code_at(self, t):
        out = self.codes[self.segment_index(t)]
        return int(out) if np.ndim(out) == 0 else out

    def state_at(self, t):
        """Operating state name at t (an array of names for an array of times)."""
        k = self.segment_index(t)
        if np.ndim(k) == 0:
            return self.states[int(k)]
        return np.asarray(STATES)[self.codes[k]]

    def power_at(self, t):
        """Power (W) at t."""
        k = self.segment_index(t)
        p = self.p[k] * (1.0 + self.a * np.sin(self.w * np.asarray(t, dtype=float) + self.phi))
        return float(p) if np.ndim(p) == 0 else p

    def energy_ws(self, a: float, b: float) -> dict[str, float]:
        """Energy over [a, b] by state (W s), summed segment by segment in closed form."""
        out = {s: 0.0 for s in STATES}
        if not b > a:
            return out
        k = int(self.segment_index(a))
        while k < len(self.starts) and self.starts[k] < b:
            out[self.states[k]] += self._seg_ws(k, max(a, float(self.starts[k])), min(b, float(self.ends[k])))
            k += 1
        return out

    def energy_at(self, t):
        """The meter's (unfaulted) energy register at t: offset + integral of P from 0 to t (kWh)."""
        e = self.machine.meter.energy_offset_kwh + (self._r(np.asarray(t, dtype=float)) - self.r0) / J_PER_KWH
        return float(e) if np.ndim(e) == 0 else e

    counter_kwh = energy_at

    def job_index_at(self, t: float) -> int | None:
        k = int(self.jobs[int(self.segment_index(t))])
        return None if k < 0 else k

    def job_at(self, t: float) -> JobSpec | None:
        """The job running at t (a job's window is [start_s, end_s)), or None."""
        k = self.job_index_at(t)
        return None if k is None else self.machine.jobs[k]

    def change_times(self, a: float, b: float) -> list[float]:
        """Segment boundaries in (a, b]."""
        return [float(x) for x in self.bounds if a < x <= b]

    # -------------------------------------------------------------- CNC view

    def _cnc_values_of(self, k: int) -> dict[str, Any]:
        start = self.starts[k]
        done = [self.machine.jobs[j] for j in self.order if self.machine.jobs[j].end_s <= start]
        current = self.machine.jobs[self.jobs[k]] if self.jobs[k] >= 0 else None
        shown = current or (done[-1] if done else None)
        status = CNC_STATUS.get(self.states[k], CNC_STATUS_IDLE)
        return {
            "channel_status": status[0], "program_status": status[1], "operation_mode": status[2],
            "program": shown.program if shown else "",
            "job_id": current.job_id if current else "",
            "parts_total": sum(j.parts for j in done),
            "product": (shown.product or "") if shown else "",
            "serial": (shown.serial or "") if shown else "",
            "subassembly": (shown.subassembly or "") if shown else "",
        }

    @cached_property
    def cnc_changes(self) -> list[tuple[float, dict[str, Any]]]:
        """What the CNC shows: ``[(-inf, all values), (t, changed values), ...]`` in time order."""
        out: list[tuple[float, dict[str, Any]]] = []
        shown: dict[str, Any] = {}
        for k in range(len(self.starts)):
            values = self._cnc_values_of(k)
            changed = {q: v for q, v in values.items() if shown.get(q, _UNSET) != v}
            if changed:
                out.append((float(self.starts[k]), changed))
                shown.update(changed)
        return out

    def cnc_values(self, t: float) -> dict[str, Any]:
        """What the CNC shows at t (raw OPC 40502-style values)."""
        return dict(self._cnc_values_of(int(self.segment_index(t))))

    def last_change(self, t: float) -> float | None:
        """When the values shown at t were set (None: unchanged since the beginning of time)."""
        start = float(self.starts[int(self.segment_index(t))])
        return start if math.isfinite(start) else None


_UNSET = object()
CNC_STATUS: dict[str, tuple[int, int, int]] = {
    # state: (ActStatus CncChannelStatus, ActProgramStatus, ActOperationMode) per OPC 40502
    "processing": (0, 1, 0),   # Active, Running, Automatic
    "setup": (0, 0, 2),        # Active, Stopped, JOG
    "interrupted": (1, 3, 0),  # Interrupted, Interrupted, Automatic
}
CNC_STATUS_IDLE = (2, 0, 0)    # Reset, Stopped, Automatic (off, standby, ready)


# ------------------------------------------------------------------------------------ helpers


def state_at(machine: MachineSim, t):
    """Operating state of ``machine`` at scenario time t (name; array of names for an array)."""
    return machine.timeline.state_at(t)


def power_at(machine: MachineSim, t):
    """Power (W) of ``machine`` at t; vectorised over numpy arrays."""
    return machine.timeline.power_at(t)


def energy_at(machine: MachineSim, t):
    """Energy register (kWh, unfaulted) of ``machine``'s meter at t; vectorised."""
    return machine.timeline.energy_at(t)


def job_at(machine: MachineSim, t: float) -> JobSpec | None:
    """The job ``machine`` runs at t, or None (idle)."""
    return machine.timeline.job_at(t)


def load(path: str | Path) -> Scenario:
    """Load and validate a scenario file; ConfigError names the file and the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    return parse(data, base=p.parent, source=str(p))


def parse(data: Any, *, base: Path | None = None, source: str = "scenario") -> Scenario:
    """Validate scenario data (a dict as in the YAML file)."""
    try:
        return Scenario.model_validate(data, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation(exc)}") from exc


def job_faults(scenario: Scenario, machine: MachineSim, job: JobSpec) -> list[dict[str, Any]]:
    """The faults that touch a job's window (the machine's own and those of the connection its
    meter is served on): kind, device, the part of the window they cover
    (``from_s``, ``to_s``; equal for a counter event), the true energy in that part
    (``energy_kwh``) and the fault's parameters (``code``, ``mode``, ``kwh``, ...)."""
    out = []
    faults = sorted((f for f in scenario.faults if f.machine == machine.id or FAULT_KINDS[f.kind].shared),
                    key=lambda f: f.from_s)
    for f in faults:
        part = f.touches(job.start_s, job.end_s)
        if part is None:
            continue
        a, b = part
        extra = {k: v for k, v in f.model_dump(include={"code", "point", "mode", "kwh", "value_w", "status"}).items()
                 if v is not None}
        out.append({"kind": f.kind, "device": f.device, "from_s": a, "to_s": b,
                    "energy_kwh": sum(machine.timeline.energy_ws(a, b).values()) / J_PER_KWH, **extra})
    return out


def truth(scenario: Scenario) -> list[dict[str, Any]]:
    """Every job's exact energy (kWh, total and by state over its window [start_s, end_s]), in
    closed form, with the (unfaulted) energy register at the job's start and end, and the faults
    touching the job (:func:`job_faults`; empty for a job reported cleanly)."""
    out = []
    for m in scenario.machines:
        tl = m.timeline
        for k in tl.order:
            job = m.jobs[k]
            by_state = {s: ws / J_PER_KWH for s, ws in tl.energy_ws(job.start_s, job.end_s).items()}
            out.append({
                "machine": m.id, "job_id": job.job_id, "program": job.program, "product": job.product,
                "serial": job.serial, "subassembly": job.subassembly, "parts": job.parts,
                "start_s": job.start_s, "end_s": job.end_s, "duration_s": job.duration_s,
                "kwh": sum(by_state.values()), "by_state": by_state,
                "counter_start_kwh": tl.energy_at(job.start_s), "counter_end_kwh": tl.energy_at(job.end_s),
                "faults": job_faults(scenario, m, job),
            })
    return out
