"""A record as one InfluxDB point in line protocol: the only encoder of records for a store.

One point per record (docs/CONTRACTS.md, "InfluxDB point"): measurement ``job_energy``
(configurable); timestamp = job start in ns; tags ``site, agent, machine, program, product,
subassembly, serial`` where non-empty; fields ``record_id, job_id, seq, kwh, kwh_<state>...,
estimated_kwh, kgco2e, factor, factor_id, duration_s, end_ns, coverage, gap_count,
longest_gap_s, counter_resets, method, hash``. The point's identity (measurement, tags,
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
from energy_agent.core.record import Record
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


def fields(rec: Record) -> dict[str, str]:
    """The point's fields as line-protocol values, by field name."""
    e, q = rec.energy, rec.quality
    out = {
        "record_id": _string(rec.record_id),
        # job_id is null for jobs the CNC gave no id; the job key (always set) stands in for it.
        "job_id": _string(rec.job.job_id or rec.job.key),
        "seq": _int(rec.seq, "seq"),
        "kwh": _float(e.kwh),
        **{f"kwh_{s}": _float(e.by_state.get(s)) for s in STATES},
        "estimated_kwh": _float(e.estimated_kwh),
        "kgco2e": _float(rec.emissions.kgco2e),
        "factor": _float(rec.emissions.factor.value),
        "factor_id": _string(rec.emissions.factor.id),
        "duration_s": _float(rec.duration_s),
        "end_ns": f"{time_ns(rec.end, 'end')}i",
        "coverage": _float(q.coverage),
        "gap_count": _int(q.gap_count, "quality.gap_count"),
        "longest_gap_s": _float(q.longest_gap_s),
        "counter_resets": _int(q.counter_resets, "quality.counter_resets"),
        "method": _string(e.method),
        "hash": _string(rec.hash),
    }
    return out


def tags(rec: Record) -> dict[str, str]:
    """The point's tags (empty ones left out)."""
    j = rec.job
    values = {"site": rec.site, "agent": rec.agent, "machine": rec.machine, "program": j.program,
              "product": j.product, "subassembly": j.subassembly, "serial": j.serial}
    return {k: v for k, v in values.items() if v}


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
