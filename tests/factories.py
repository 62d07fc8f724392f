"""Finished jobs and records built with the agent's own types, for tests that need records."""

from __future__ import annotations

import asyncio
import time

from energy_agent.core import states
from energy_agent.core.record import JobRecord, Record, parse_record
from energy_agent.domain.energy import JobEnergy
from energy_agent.domain.spans import FinishedJob, JobInfo
from energy_agent.drivers.config import Calibration, MeterDevice
from energy_agent.records import record
from energy_agent.records.config import EmissionFactor

FACTOR = EmissionFactor(value=0.6592, authority="MONRE DCC", document="notice 2023", region="VN", year=2023,
                        method="CDM combined margin", basis="location")
METER = MeterDevice(id="pm-1", host="127.0.0.1", profile="eastron-sdm630", accuracy="class 1",
                    calibration=Calibration(certificate="C-1"))
T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def finished_job(*, machine: str = "m1", key: str = "J-1", start_wall: float = T0, duration_s: float = 300.0,
                 kwh: float = 1.25, program: str | None = "O1001", product: str | None = "SPU-40",
                 serial: str | None = "SN-1", subassembly: str | None = "spindle", parts: int | None = 1,
                 flags: tuple[str, ...] = ()) -> FinishedJob:
    """A job that ran ``duration_s`` in processing, except 0.25 kWh split over ready/interrupted/setup."""
    by_state = [0.0] * len(states.STATES)
    rest = min(kwh, 0.25)
    by_state[states.code("ready")], by_state[states.code("interrupted")], by_state[states.code("setup")] = (
        rest / 5, 2 * rest / 5, 2 * rest / 5)
    by_state[states.code("processing")] = kwh - rest
    energy = JobEnergy(kwh_by_state=tuple(by_state), kwh=kwh, estimated_kwh=0.0, method="counter", coverage=1.0,
                       gap_count=0, longest_gap_s=0.0, counter_resets=0, counter_rollovers=0, counter_jumps=0)
    info = JobInfo(key=key, key_point="job_id", start=100.0, start_wall=start_wall, job_id=key, program=program,
                   product=product, serial=serial, subassembly=subassembly)
    return FinishedJob(machine=machine, info=info, end=100.0 + duration_s, end_wall=start_wall + duration_s,
                       end_reason="key_cleared", parts=parts, energy=energy, samples=int(duration_s) + 1,
                       bad_samples=0, median_interval_s=1.0, flags=flags)


def build(seq: int, prev_hash: str, *, site: str = "plant", agent: str = "gw", factor: EmissionFactor = FACTOR,
          **job) -> JobRecord:
    return record.build(site=site, agent=agent, seq=seq, prev_hash=prev_hash, span=finished_job(**job),  # type: ignore[return-value]
                        factor=factor.as_factor("vn-2023"), meter=METER.as_ref("eastron-sdm630"), cnc=None,
                        config_hash="c" * 64)


def edited(rec: Record, change) -> Record:
    """A copy of ``rec`` whose JSON form ``change(d)`` edited (in place), parsed back: a tampered record."""
    d = rec.to_json()
    change(d)
    return parse_record(d)


async def fill(ledger, machine: str, n: int, *, first: int = 1, spacing_s: float = 1000.0, **kw) -> list[Record]:
    """Append n records of consecutive jobs J-<first>… to the ledger; returns them."""
    out = []
    for i in range(first, first + n):
        out.append(await ledger.append(machine, lambda seq, prev, i=i: build(
            seq, prev, machine=machine, key=f"J-{i}", start_wall=T0 + spacing_s * i, kwh=0.5 + i / 10, **kw)))
    return out


async def until(cond, timeout: float = 3.0, what: str = "condition", every: float = 0.01):
    """Poll ``cond`` (a function, maybe returning an awaitable) every ``every`` s until truthy;
    its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(every)


def pending_job(*, machine: str = "m1", key: str = "J-1", start_wall: float = T0, duration_s: float = 300.0,
                kwh: float = 1.25):
    """A finished job as the agent's tracker hands it over (``compute=None``): the span and its
    kernel inputs, energy still to be computed. Made by feeding a real tracker ``duration_s``
    of constant power (``kwh`` over the job) sampled every 10 s."""
    from energy_agent.core.reading import Reading
    from energy_agent.domain.tracker import MachineTracker, Pending
    from energy_agent.drivers.nodemap import load_nodemap

    out: list = []
    tr = MachineTracker(machine, load_nodemap("opc40502").rules, max_gap_s=30.0, close_timeout_s=60.0,
                        compute=None, on_finished=out.append)
    watts = kwh * 3.6e6 / duration_s
    run = {"channel_status": 0, "program_status": 1, "operation_mode": 0, "program": "O1", "job_id": key,
           "parts_total": 0}
    t0 = start_wall - 1_000_000.0  # monotonic seconds of this tracker
    e = 100.0
    tr.on_meter(Reading("pm", t0, start_wall, {"power_w": watts, "energy_import_kwh": e}))
    tr.on_cnc(Reading("cnc", t0, start_wall, run))
    for k in range(1, int(duration_s // 10) + 2):
        t = t0 + 10.0 * k
        if t - t0 > duration_s and not out:
            tr.on_cnc(Reading("cnc", t0 + duration_s, start_wall + duration_s, {**run, "job_id": "", "parts_total": 1}))
        e += watts * 10.0 / 3.6e6
        tr.on_meter(Reading("pm", t, start_wall + 10.0 * k, {"power_w": watts, "energy_import_kwh": e}))
    (job,) = [p for p in out if isinstance(p, Pending) and p.ending.info is not None]
    return job
