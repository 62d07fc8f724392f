"""Building the record of a finished job or interval, and checking per-machine hash chains.

The record types and their canonical form live in ``energy_agent.core.record``. A record's
``prev_hash`` is the previous record's hash on the same machine (64 zeros for the first), so a
verifier holding the records can see that none was altered, dropped or reordered. Its
``record_id`` is derived from what identifies the span (site, agent, machine, job key or
``interval``, start), so a record published twice is recognisably the same record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Final

from energy_agent import __version__
from energy_agent.core import states
from energy_agent.core.record import (
    GENESIS,
    SCHEMA_INTERVAL,
    SCHEMA_JOB,
    Boundaries,
    Boundary,
    ByState,
    CncRef,
    Emissions,
    Energy,
    Factor,
    IntervalRecord,
    IntervalRef,
    JobRecord,
    JobRef,
    MeterRef,
    Provenance,
    Quality,
    Record,
)
from energy_agent.domain.energy import JobEnergy
from energy_agent.domain.spans import Finished, FinishedInterval, FinishedJob

KERNEL = "job_energy/3"
ALLOCATION: Final = "direct"
"""Energy metered inside the job window is the job's; energy between jobs is in the machine's
interval records (allocation to jobs is a rule of the roll-up, not of the record)."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_id(site: str, agent: str, machine: str, key: str, start_iso: str) -> str:
    return hashlib.sha256(f"{site}/{agent}/{machine}/{key}/{start_iso}".encode()).hexdigest()[:32]


def _r(x: float, nd: int = 9) -> float:
    return round(float(x), nd) + 0.0  # +0.0 turns -0.0 into 0.0


def _energy(en: JobEnergy, flags: set[str], states_known: bool) -> Energy:
    """The record's energy; unknown (None, with the reason) when no part of the window was
    covered, never 0 kWh for unknown."""
    if en.method == "none":
        reason = ("meter_unavailable: the meter did not answer during the window" if "meter_unavailable" in flags
                  else "no usable counter or power reading covers the window")
        return Energy(kwh=None, estimated_kwh=None, method="none", by_state=None, unknown_reason=reason)
    by_state = ByState(*(_r(en.kwh_by_state[i]) for i in range(len(states.STATES)))) if states_known else None
    return Energy(kwh=_r(en.kwh), estimated_kwh=_r(en.estimated_kwh), method=en.method, by_state=by_state,
                  unknown_reason=None)


def _quality(span: Finished, flags: set[str]) -> Quality:
    en = span.energy
    return Quality(
        coverage=_r(en.coverage, 6),
        gap_count=int(en.gap_count),
        longest_gap_s=_r(en.longest_gap_s, 6),
        counter_resets=int(en.counter_resets),
        counter_rollovers=int(en.counter_rollovers),
        counter_jumps=int(en.counter_jumps),
        estimated_share=_r(en.estimated_kwh / en.kwh, 6) if en.kwh > 0 else 0.0,
        samples=span.samples,
        bad_samples=span.bad_samples,
        median_interval_s=None if span.median_interval_s is None else _r(span.median_interval_s, 6),
        flags=tuple(sorted(flags)),
    )


def _flags(span: Finished, start_wall: float, factor: Factor, meter: MeterRef) -> set[str]:
    flags = set(span.flags)
    day = datetime.fromtimestamp(start_wall, timezone.utc).date().isoformat()
    if (factor.valid_from and day < factor.valid_from) or (factor.valid_to and day > factor.valid_to):
        flags.add("factor_outside_validity")
    cal = meter.calibration
    if cal is not None and cal.valid_until is not None and day > cal.valid_until:
        flags.add("meter_calibration_expired")
    return flags


def build(*, site: str, agent: str, seq: int, prev_hash: str, span: Finished, factor: Factor,
          meter: MeterRef, cnc: CncRef | None, config_hash: str) -> JobRecord | IntervalRecord:
    """The hashed (unsigned) record of a finished job or interval."""
    if isinstance(span, FinishedInterval):
        return _interval(site=site, agent=agent, seq=seq, prev_hash=prev_hash, iv=span, factor=factor,
                         meter=meter, cnc=cnc, config_hash=config_hash)
    return _job(site=site, agent=agent, seq=seq, prev_hash=prev_hash, job=span, factor=factor, meter=meter,
                cnc=cnc, config_hash=config_hash)


def _job(*, site: str, agent: str, seq: int, prev_hash: str, job: FinishedJob, factor: Factor,
         meter: MeterRef, cnc: CncRef | None, config_hash: str) -> JobRecord:
    info = job.info
    start, end = iso(info.start_wall), iso(job.end_wall)
    flags = _flags(job, info.start_wall, factor, meter)
    energy = _energy(job.energy, flags, states_known=True)
    rec = JobRecord(
        schema=SCHEMA_JOB,
        record_id=record_id(site, agent, job.machine, info.key, start),
        site=site,
        agent=agent,
        machine=job.machine,
        seq=seq,
        job=JobRef(key=info.key, job_id=info.job_id, program=info.program, product=info.product,
                   serials=(info.serial,) if info.serial else (), subassembly=info.subassembly, order=None,
                   assignment=info.assignment, parts=job.parts, end_reason=job.end_reason),  # type: ignore[arg-type]
        start=start,
        end=end,
        duration_s=_r(job.end - info.start, 6),
        boundaries=Boundaries(Boundary(info.start_basis, info.start_reason),  # type: ignore[arg-type]
                              Boundary(job.end_basis, job.end_note)),  # type: ignore[arg-type]
        energy=energy,
        emissions=Emissions(kgco2e=None if energy.kwh is None else _r(energy.kwh * factor.value), factor=factor),
        quality=_quality(job, flags),
        meter=meter,
        cnc=cnc,
        allocation=ALLOCATION,
        provenance=Provenance(agent_version=__version__, config_hash=config_hash, kernel=KERNEL),
        prev_hash=prev_hash,
        hash="",
    )
    return rec.with_hash()


def _interval(*, site: str, agent: str, seq: int, prev_hash: str, iv: FinishedInterval, factor: Factor,
              meter: MeterRef, cnc: CncRef | None, config_hash: str) -> IntervalRecord:
    start, end = iso(iv.start_wall), iso(iv.end_wall)
    flags = _flags(iv, iv.start_wall, factor, meter)
    # Unobserved: the CNC's states are not known, so neither is the split by state.
    energy = _energy(iv.energy, flags, states_known=iv.kind == "idle")
    rec = IntervalRecord(
        schema=SCHEMA_INTERVAL,
        record_id=record_id(site, agent, iv.machine, "interval", start),
        site=site,
        agent=agent,
        machine=iv.machine,
        seq=seq,
        interval=IntervalRef(kind=iv.kind, reason=iv.reason, parts=iv.parts),  # type: ignore[arg-type]
        start=start,
        end=end,
        duration_s=_r(iv.end - iv.start, 6),
        energy=energy,
        emissions=Emissions(kgco2e=None if energy.kwh is None else _r(energy.kwh * factor.value), factor=factor),
        quality=_quality(iv, flags),
        meter=meter,
        cnc=cnc,
        provenance=Provenance(agent_version=__version__, config_hash=config_hash, kernel=KERNEL),
        prev_hash=prev_hash,
        hash="",
    )
    return rec.with_hash()


# --------------------------------------------------------------------------- verification


def verify_chain(records: Iterable[Record], anchors: dict[str, tuple[int, str]] | None = None) -> list[str]:
    """Problems found in per-machine chains (records in any order); empty when intact.

    ``anchors`` (machine -> (seq, hash) of its last pruned record, see ``Ledger.anchors``) is
    where a pruned chain now begins: its first remaining record must follow that one.
    """
    problems: list[str] = []
    anchors = anchors or {}
    by_machine: dict[str, list[Record]] = {}
    for r in records:
        by_machine.setdefault(r.machine, []).append(r)
    for machine, recs in sorted(by_machine.items()):
        recs.sort(key=lambda r: r.seq)
        prev_seq, prev = anchors.get(machine, (None, None))
        for r in recs:
            rid = r.record_id
            if r.body_hash() != r.hash:
                problems.append(f"{machine} seq {r.seq} ({rid}): hash does not match the content")
            if prev is None or prev_seq is None:
                if r.seq != 1:
                    problems.append(f"{machine}: seq 1..{r.seq - 1} missing (and no prune anchor)")
                elif r.prev_hash != GENESIS:
                    problems.append(f"{machine} seq 1 ({rid}): first record must chain to the genesis hash")
            else:
                if r.seq != prev_seq + 1:
                    problems.append(f"{machine}: seq {prev_seq + 1}..{r.seq - 1} missing")
                elif r.prev_hash != prev:
                    problems.append(f"{machine} seq {r.seq} ({rid}): prev_hash does not match seq {prev_seq}")
            prev, prev_seq = r.hash, r.seq
    return problems
