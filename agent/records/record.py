"""Building a finished job's record and checking per-machine hash chains.

The record type and its canonical form live in ``energy_agent.core.record``. A record's
``prev_hash`` is the previous record's hash on the same machine (64 zeros for the first), so a
verifier holding the records can see that none was altered, dropped or reordered. Its
``record_id`` is derived from what identifies the job (site, agent, machine, job key, start),
so a record published twice is recognisably the same record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from energy_agent import __version__
from energy_agent.core import states
from energy_agent.core.record import (
    GENESIS,
    SCHEMA,
    ByState,
    CncRef,
    Emissions,
    Energy,
    Factor,
    JobRef,
    MeterRef,
    Provenance,
    Quality,
    Record,
)

if TYPE_CHECKING:
    from energy_agent.domain.tracker import FinishedJob

KERNEL = "job_energy/3"
ALLOCATION = "direct"
"""Energy metered inside the job window is the job's; idle time between jobs is not allocated."""


# --------------------------------------------------------------------------- building


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_id(site: str, agent: str, machine: str, key: str, start_iso: str) -> str:
    return hashlib.sha256(f"{site}/{agent}/{machine}/{key}/{start_iso}".encode()).hexdigest()[:32]


def _r(x: float, nd: int = 9) -> float:
    return round(float(x), nd) + 0.0  # +0.0 turns -0.0 into 0.0


def build(*, site: str, agent: str, seq: int, prev_hash: str, job: FinishedJob, factor: Factor,
          meter: MeterRef, cnc: CncRef | None, config_hash: str) -> Record:
    """The hashed record of a finished job."""
    info, en = job.info, job.energy
    start, end = iso(info.start_wall), iso(job.end_wall)
    kwh = _r(en.kwh)
    flags = set(job.flags)
    day = datetime.fromtimestamp(info.start_wall, timezone.utc).date().isoformat()
    if (factor.valid_from and day < factor.valid_from) or (factor.valid_to and day > factor.valid_to):
        flags.add("factor_outside_validity")
    rec = Record(
        schema=SCHEMA,
        record_id=record_id(site, agent, job.machine, info.key, start),
        site=site,
        agent=agent,
        machine=job.machine,
        seq=seq,
        job=JobRef(key=info.key, job_id=info.job_id, program=info.program, product=info.product,
                   serial=info.serial, subassembly=info.subassembly, parts=job.parts, end_reason=job.end_reason),
        start=start,
        end=end,
        duration_s=_r(job.end - info.start, 6),
        energy=Energy(kwh=kwh, estimated_kwh=_r(en.estimated_kwh), method=en.method,
                      by_state=ByState(*(_r(en.kwh_by_state[i]) for i in range(len(states.STATES))))),
        emissions=Emissions(kgco2e=_r(en.kwh * factor.value), factor=factor),
        quality=Quality(
            coverage=_r(en.coverage, 6),
            gap_count=int(en.gap_count),
            longest_gap_s=_r(en.longest_gap_s, 6),
            counter_resets=int(en.counter_resets),
            counter_rollovers=int(en.counter_rollovers),
            counter_jumps=int(en.counter_jumps),
            estimated_share=_r(en.estimated_kwh / en.kwh, 6) if en.kwh > 0 else 0.0,
            samples=job.samples,
            bad_samples=job.bad_samples,
            median_interval_s=None if job.median_interval_s is None else _r(job.median_interval_s, 6),
            flags=tuple(sorted(flags)),
        ),
        meter=meter,
        cnc=cnc,
        allocation=ALLOCATION,
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
