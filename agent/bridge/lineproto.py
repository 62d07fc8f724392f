"""A record as one InfluxDB point in line protocol: the only encoder of records for a store.

One point per record (docs/CONTRACTS.md, "InfluxDB points"). Jobs: measurement ``job_energy``
(configurable); timestamp = job start in ns; tags ``site, agent, machine, program, product,
subassembly, serial`` (the serial when the job has exactly one) where non-empty; fields
``record_id, job_id, seq, kwh, kwh_<state>..., estimated_kwh, kgco2e, factor, factor_id,
duration_s, end_ns, coverage, gap_count, longest_gap_s, counter_resets, method, hash`` and
(schema 2) ``flags, serials, parts, start_basis, end_basis``. Energy that is unknown is left
out (with ``unknown_reason``), never written as 0. Intervals: measurement ``machine_energy``,
tags ``site, agent, machine, kind``, the same energy and quality fields, ``reason``, ``parts``. The point's identity (measurement, tags,
timestamp) depends only on the record, so writing a record twice overwrites its own point.
Numbers are written with fixed types (floats as floats even when the JSON carried ``1``,
integers as integers), so a series never meets a field-type conflict. Tags and fields are
written sorted by key, the order InfluxDB stores them in.

The record was validated when it was parsed (``Record.parse``); what is left to refuse here is
what InfluxDB cannot store: a time outside 1677..2262, an integer beyond int64. Those raise
:class:`RecordError` naming the field.
"""

from __future__ import annotations

from datetime import datetime, timezone

from energy_agent.core.errors import RecordError
from energy_agent.core.record import Energy, IntervalRecord, JobRecord, JobRecordV1, Record
from energy_agent.core.states import STATES

TAGS = ("site", "agent", "machine", "program", "product", "subassembly", "serial")
_MIN_NS, _MAX_NS = -(2**63) + 2, 2**63 - 2
"""InfluxDB stores int64 nanoseconds: 1677-09-21 .. 2262-04-11."""
_INT64 = 2**63
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})


def time_ns(stamp: str, field: str) -> int:
    """Nanoseconds since the epoch of a record time (``2026-01-31T12:00:00.000000Z``)."""
    try:
        dt = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise RecordError(f"record field {field}: {stamp[:64]!r} is not a UTC time like "
                          "2026-01-31T12:00:00.000000Z") from exc
    d = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    ns = (d.days * 86400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000
    if not _MIN_NS <= ns <= _MAX_NS:
        raise RecordError(f"record field {field}: {stamp!r} is outside what InfluxDB can store (1677..2262)")
    return ns


def _float(v: float) -> str:
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


def _int(v: int, field: str) -> str:
    if not 0 <= v < _INT64:
        raise RecordError(f"record field {field} must be an integer in [0, 2^63), not {v}")
    return f"{v}i"


def _string(v: str) -> str:
    return '"' + v.translate(_ESCAPE_STRING) + '"'


def _energy_fields(rec: Record) -> dict[str, str]:
    """kWh, by state, estimated and CO2e; left out when unknown (never written as 0)."""
    e = rec.energy
    out: dict[str, str] = {}
    if e.kwh is not None:
        out["kwh"] = _float(e.kwh)
        out["kgco2e"] = _float(rec.emissions.kgco2e)  # type: ignore[arg-type]  # known with kwh
    if e.estimated_kwh is not None:
        out["estimated_kwh"] = _float(e.estimated_kwh)
    if e.by_state is not None:
        out.update({f"kwh_{s}": _float(e.by_state.get(s)) for s in STATES})
    if isinstance(e, Energy) and e.unknown_reason is not None:
        out["unknown_reason"] = _string(e.unknown_reason)
    return out


def _common_fields(rec: Record) -> dict[str, str]:
    q = rec.quality
    out = {
        "record_id": _string(rec.record_id),
        "seq": _int(rec.seq, "seq"),
        **_energy_fields(rec),
        "factor": _float(rec.emissions.factor.value),
        "factor_id": _string(rec.emissions.factor.id),
        "duration_s": _float(rec.duration_s),
        "end_ns": f"{time_ns(rec.end, 'end')}i",
        "coverage": _float(q.coverage),
        "gap_count": _int(q.gap_count, "quality.gap_count"),
        "longest_gap_s": _float(q.longest_gap_s),
        "counter_resets": _int(q.counter_resets, "quality.counter_resets"),
        "method": _string(rec.energy.method),
        "hash": _string(rec.hash),
    }
    if not isinstance(rec, JobRecordV1):
        out["flags"] = _string(",".join(q.flags))
    return out


def fields(rec: Record) -> dict[str, str]:
    """The point's fields as line-protocol values, by field name."""
    out = _common_fields(rec)
    if isinstance(rec, IntervalRecord):
        out["reason"] = _string(rec.interval.reason or "")
        if rec.interval.parts is not None:
            out["parts"] = _int(rec.interval.parts, "interval.parts")
        return out
    # job_id is null for jobs the CNC gave no id; the job key (always set) stands in for it.
    out["job_id"] = _string(rec.job.job_id or rec.job.key)
    if isinstance(rec, JobRecord):
        out["serials"] = _string(",".join(rec.job.serials))
        out["start_basis"] = _string(rec.boundaries.start.basis)
        out["end_basis"] = _string(rec.boundaries.end.basis)
        if rec.job.parts is not None:
            out["parts"] = _int(rec.job.parts, "job.parts")
    return out


def tags(rec: Record) -> dict[str, str]:
    """The point's tags (empty ones left out)."""
    values: dict[str, str | None] = {"site": rec.site, "agent": rec.agent, "machine": rec.machine}
    if isinstance(rec, IntervalRecord):
        values["kind"] = rec.interval.kind
    else:
        j = rec.job
        serial = j.serial if isinstance(rec, JobRecordV1) else (j.serials[0] if len(j.serials) == 1 else None)
        values |= {"program": j.program, "product": j.product, "subassembly": j.subassembly, "serial": serial}
    return {k: v for k, v in values.items() if v}


def measurement_of(rec: Record, jobs: str = "job_energy", intervals: str = "machine_energy") -> str:
    """Job records go to ``jobs``, interval records to ``intervals``."""
    return intervals if isinstance(rec, IntervalRecord) else jobs


def record_line(rec: Record, measurement: str = "job_energy") -> bytes:
    """The record's point as one line of line protocol (UTF-8, no newline)."""
    line = measurement.translate(_ESCAPE_MEASUREMENT)
    for key, value in sorted(tags(rec).items()):
        v = value.translate(_ESCAPE_KEY)
        line += f",{key}={v} " if v.endswith("\\") else f",{key}={v}"
    line += " " + ",".join(f"{k}={v}" for k, v in sorted(fields(rec).items()))
    line += f" {time_ns(rec.start, 'start')}"
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON \ud800 escape
        raise RecordError(f"the record holds text that is not valid Unicode: {exc}") from exc
