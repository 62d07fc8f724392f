"""Process-level emission records: schema, canonical form, hash chain.

A record is a JSON object (schema ``energy-agent.job-record/1``, documented in the README).
Its ``hash`` is SHA-256 over the RFC 8785 canonical JSON of the record without ``hash``; its
``prev_hash`` is the previous record's hash on the same machine (64 zeros for the first), so
a verifier holding the records can see that none was altered, dropped or reordered. Its
``record_id`` is derived from what identifies the job (site, agent, machine, job key, start),
so a record published twice is recognisably the same record.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

from energy_agent import __version__
from energy_agent.core import states
from energy_agent.core.errors import RecordError

SCHEMA = "energy-agent.job-record/1"
GENESIS = "0" * 64
KERNEL = "job_energy/3"
ALLOCATION = "direct"
"""Energy metered inside the job window is the job's; idle time between jobs is not allocated."""


# --------------------------------------------------------------------------- canonical JSON


def _number(x: float | int) -> str:
    """ECMAScript Number serialisation, as RFC 8785 requires."""
    if isinstance(x, bool):
        raise TypeError("bool is not a number")
    if isinstance(x, int):
        if abs(x) >= 2**53:
            raise RecordError(f"integer {x} is outside the range JSON numbers carry exactly")
        return str(x)
    if not math.isfinite(x):
        raise RecordError(f"{x} cannot be written in JSON")
    if x == 0:
        return "0"
    sign, digits_t, exp = Decimal(repr(x)).as_tuple()
    digits = "".join(map(str, digits_t)).rstrip("0") or "0"
    exp += len("".join(map(str, digits_t))) - len(digits)
    k = len(digits)
    n = exp + k  # value = 0.digits * 10^n
    if k <= n <= 21:
        s = digits + "0" * (n - k)
    elif 0 < n <= 21:
        s = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        s = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        s = digits[0] + ("." + digits[1:] if k > 1 else "") + ("e+" if e >= 0 else "e-") + str(abs(e))
    return ("-" if sign else "") + s


def _canon(v: Any, out: list[str]) -> None:
    if v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, (int, float)):
        out.append(_number(v))
    elif isinstance(v, str):
        out.append(json.dumps(v, ensure_ascii=False))
    elif isinstance(v, dict):
        out.append("{")
        for i, k in enumerate(sorted(v, key=lambda s: s.encode("utf-16-be"))):
            if not isinstance(k, str):
                raise RecordError(f"object key {k!r} is not a string")
            if i:
                out.append(",")
            out.append(json.dumps(k, ensure_ascii=False))
            out.append(":")
            _canon(v[k], out)
        out.append("}")
    elif isinstance(v, (list, tuple)):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _canon(item, out)
        out.append("]")
    else:
        raise RecordError(f"value of type {type(v).__name__} cannot be written in a record")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON, UTF-8."""
    out: list[str] = []
    _canon(value, out)
    return "".join(out).encode("utf-8")


def record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


# --------------------------------------------------------------------------- building


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_id(site: str, agent: str, machine: str, key: str, start_iso: str) -> str:
    return hashlib.sha256(f"{site}/{agent}/{machine}/{key}/{start_iso}".encode()).hexdigest()[:32]


def _r(x: float, nd: int = 9) -> float:
    return round(float(x), nd) + 0.0  # +0.0 turns -0.0 into 0.0


def _date(d: date | None) -> str | None:
    return d.isoformat() if d else None


def build(*, site: str, agent: str, seq: int, prev_hash: str, job: Any, factor_id: str, factor: Any,
          meter: Any, profile: str, cnc: Any | None, config_hash: str) -> dict:
    """Build and hash the record of a finished job (``energy_agent.domain.tracker.FinishedJob``)."""
    info, en = job.info, job.energy
    start, end = iso(info.start_wall), iso(job.end_wall)
    kwh = _r(en.kwh)
    flags = set(job.flags)
    day = datetime.fromtimestamp(info.start_wall, timezone.utc).date()
    if (factor.valid_from and day < factor.valid_from) or (factor.valid_to and day > factor.valid_to):
        flags.add("factor_outside_validity")
    rec = {
        "schema": SCHEMA,
        "record_id": record_id(site, agent, job.machine, info.key, start),
        "site": site,
        "agent": agent,
        "machine": job.machine,
        "seq": seq,
        "job": {
            "key": info.key,
            "job_id": info.job_id,
            "program": info.program,
            "product": info.product,
            "serial": info.serial,
            "subassembly": info.subassembly,
            "parts": job.parts,
            "end_reason": job.end_reason,
        },
        "start": start,
        "end": end,
        "duration_s": _r(job.end - info.start, 6),
        "energy": {
            "kwh": kwh,
            "estimated_kwh": _r(en.estimated_kwh),
            "method": en.method,
            "by_state": {name: _r(en.kwh_by_state[i]) for i, name in enumerate(states.STATES)},
        },
        "emissions": {
            "kgco2e": _r(en.kwh * factor.value),
            "factor": {
                "id": factor_id,
                "value": factor.value,
                "unit": factor.unit,
                "authority": factor.authority,
                "document": factor.document,
                "region": factor.region,
                "year": factor.year,
                "method": factor.method,
                "basis": factor.basis,
                "valid_from": _date(factor.valid_from),
                "valid_to": _date(factor.valid_to),
            },
        },
        "quality": {
            "coverage": _r(en.coverage, 6),
            "gap_count": int(en.gap_count),
            "longest_gap_s": _r(en.longest_gap_s, 6),
            "counter_resets": int(en.counter_resets),
            "counter_rollovers": int(en.counter_rollovers),
            "counter_jumps": int(en.counter_jumps),
            "estimated_share": _r(en.estimated_kwh / en.kwh, 6) if en.kwh > 0 else 0.0,
            "samples": job.samples,
            "bad_samples": job.bad_samples,
            "median_interval_s": None if job.median_interval_s is None else _r(job.median_interval_s, 6),
            "flags": sorted(flags),
        },
        "meter": {
            "id": meter.id,
            "profile": profile,
            "accuracy": meter.accuracy,
            "calibration": None if meter.calibration is None else {
                "certificate": meter.calibration.certificate,
                "valid_until": _date(meter.calibration.valid_until),
            },
            "boundary": meter.boundary,
        },
        "cnc": None if cnc is None else {"id": cnc.id, "node_map": cnc.node_map},
        "allocation": ALLOCATION,
        "provenance": {"agent_version": __version__, "config_hash": config_hash, "kernel": KERNEL},
        "prev_hash": prev_hash,
    }
    rec["hash"] = record_hash(rec)
    return rec


# --------------------------------------------------------------------------- verification


def verify_chain(records: Iterable[dict], anchors: dict[str, tuple[int, str]] | None = None) -> list[str]:
    """Problems found in per-machine chains (records in any order); empty when intact.

    ``anchors`` (machine -> (seq, hash) of its last pruned record, see ``Ledger.anchors``) is
    where a pruned chain now begins: its first remaining record must follow that one.
    """
    problems: list[str] = []
    anchors = anchors or {}
    by_machine: dict[str, list[dict]] = {}
    for r in records:
        by_machine.setdefault(r.get("machine", "?"), []).append(r)
    for machine, recs in sorted(by_machine.items()):
        recs.sort(key=lambda r: r.get("seq", 0))
        prev_seq, prev = anchors.get(machine, (None, None))
        for r in recs:
            rid = r.get("record_id", "?")
            if r.get("schema") != SCHEMA:
                problems.append(f"{machine} seq {r.get('seq')} ({rid}): unknown schema {r.get('schema')!r}")
                continue
            if record_hash(r) != r.get("hash"):
                problems.append(f"{machine} seq {r['seq']} ({rid}): hash does not match the content")
            if prev is None:
                if r["seq"] != 1:
                    problems.append(f"{machine}: seq 1..{r['seq'] - 1} missing (and no prune anchor)")
                elif r["prev_hash"] != GENESIS:
                    problems.append(f"{machine} seq 1 ({rid}): first record must chain to the genesis hash")
            else:
                if r["seq"] != prev_seq + 1:
                    problems.append(f"{machine}: seq {prev_seq + 1}..{r['seq'] - 1} missing")
                elif r["prev_hash"] != prev:
                    problems.append(f"{machine} seq {r['seq']} ({rid}): prev_hash does not match seq {prev_seq}")
            prev, prev_seq = r["hash"], r["seq"]
    return problems
