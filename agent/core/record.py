"""The job record: one frozen, typed object per finished job, the only way code reads or builds
a record.

The JSON form is the evidence (schema ``energy-agent.job-record/1``, README "Records"): field
names and nesting are fixed, and the canonical form (RFC 8785, the ``rfc8785`` package) is
produced in one place, :meth:`Record.canonical`. ``hash`` is SHA-256 of the canonical JSON of
the record without ``hash``; ``prev_hash`` is the previous record's hash on the same machine.

:meth:`Record.parse` reads a record from JSON (a payload, a ledger row, a bundle) strictly: a
missing or extra field, a wrong type (a string where a number belongs, 2.0 where an integer
belongs, true for a number), a non-finite number, a malformed id or time raises
:class:`RecordError` naming the field, e.g. ``record field energy.kwh: Input should be a valid
number``. JSON integers are accepted where floats belong (canonical JSON writes 1.0 as 1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Any, Literal

import rfc8785
from pydantic import ConfigDict, StringConstraints, TypeAdapter, ValidationError

from energy_agent.core.errors import RecordError
from energy_agent.core.states import STATES
from energy_agent.core.validation import format_validation

SCHEMA = "energy-agent.job-record/1"
GENESIS = "0" * 64
"""``prev_hash`` of a machine's first record."""

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)
MAX_TEXT = 4096
"""Longest free text a record carries (InfluxDB takes 64 KiB; no record needs this much)."""

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Stamp = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")]
"""UTC time with microseconds, ``2026-01-31T12:00:00.000000Z``."""
Day = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d\d-\d\d$")]


@dataclass(frozen=True, slots=True)
class JobRef:
    """What the job was: its key (job id, else program), what it made and why it ended."""

    __pydantic_config__ = _STRICT
    key: Text
    job_id: Text | None
    program: Text | None
    product: Text | None
    serial: Text | None
    subassembly: Text | None
    parts: int | None
    end_reason: Text


@dataclass(frozen=True, slots=True)
class ByState:
    """kWh per operating state (the names of ``energy_agent.core.states.STATES``)."""

    __pydantic_config__ = _STRICT
    off: float
    standby: float
    ready: float
    processing: float
    interrupted: float
    setup: float

    def get(self, state: str) -> float:
        return float(getattr(self, state))

    def items(self) -> list[tuple[str, float]]:
        return [(s, self.get(s)) for s in STATES]


assert tuple(f.name for f in fields(ByState)) == STATES, "ByState must list the operating states in order"


@dataclass(frozen=True, slots=True)
class Energy:
    __pydantic_config__ = _STRICT
    kwh: float
    estimated_kwh: float
    """The part of ``kwh`` from power integration rather than counter deltas."""
    method: Literal["counter", "power", "mixed", "none"]
    by_state: ByState


@dataclass(frozen=True, slots=True)
class Factor:
    """A declared emission factor with everything a verifier asks about it."""

    __pydantic_config__ = _STRICT
    id: Text
    value: float
    unit: Literal["kgCO2e/kWh"]
    authority: Text
    document: Text
    region: Text
    year: int
    method: Text
    basis: Literal["location", "market"]
    valid_from: Day | None
    valid_to: Day | None


@dataclass(frozen=True, slots=True)
class Emissions:
    __pydantic_config__ = _STRICT
    kgco2e: float
    factor: Factor


@dataclass(frozen=True, slots=True)
class Quality:
    __pydantic_config__ = _STRICT
    coverage: float
    gap_count: int
    longest_gap_s: float
    counter_resets: int
    counter_rollovers: int
    counter_jumps: int
    estimated_share: float
    samples: int
    bad_samples: int
    median_interval_s: float | None
    flags: tuple[Text, ...]


@dataclass(frozen=True, slots=True)
class Calibration:
    __pydantic_config__ = _STRICT
    certificate: Text | None
    valid_until: Day | None


@dataclass(frozen=True, slots=True)
class MeterRef:
    """The meter whose readings the energy comes from."""

    __pydantic_config__ = _STRICT
    id: Ident
    profile: Text
    accuracy: Text | None
    calibration: Calibration | None
    boundary: Text | None


@dataclass(frozen=True, slots=True)
class CncRef:
    __pydantic_config__ = _STRICT
    id: Ident
    node_map: Text


@dataclass(frozen=True, slots=True)
class Provenance:
    __pydantic_config__ = _STRICT
    agent_version: Text
    config_hash: Hex64
    kernel: Text


@dataclass(frozen=True, slots=True)
class Record:
    """One finished job's process-level emission record (schema ``energy-agent.job-record/1``)."""

    __pydantic_config__ = _STRICT
    schema: Literal["energy-agent.job-record/1"]
    record_id: Hex32
    site: Ident
    agent: Ident
    machine: Ident
    seq: int
    job: JobRef
    start: Stamp
    end: Stamp
    duration_s: float
    energy: Energy
    emissions: Emissions
    quality: Quality
    meter: MeterRef
    cnc: CncRef | None
    allocation: Literal["direct"]
    provenance: Provenance
    prev_hash: Hex64
    hash: Hex64

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values (dicts, lists, str, int, float, None)."""
        return _plain(asdict(self))

    def canonical(self) -> bytes:
        """RFC 8785 canonical JSON (UTF-8): what is stored, published, hashed and signed."""
        return canonical_json(self.to_json())

    def body_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the record without ``hash``."""
        body = self.to_json()
        del body["hash"]
        return hashlib.sha256(canonical_json(body)).hexdigest()

    def with_hash(self) -> Record:
        """This record with ``hash`` set from its content."""
        return replace(self, hash=self.body_hash())

    @classmethod
    def parse(cls, data: bytes | str | dict[str, Any]) -> Record:
        """A record from JSON text or an already decoded object; RecordError names what is wrong."""
        if isinstance(data, dict):  # strict validation reads JSON text: the same rules either way
            try:
                data = json.dumps(data, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise RecordError(f"not JSON: {exc}") from exc
        try:
            return _ADAPTER.validate_json(data)
        except ValidationError as exc:
            raise RecordError(_describe(exc)) from exc

    # ------------------------------------------------------------------ identity

    def topic(self, prefix: str) -> str:
        """The MQTT topic of this record: ``<prefix>/<site>/<agent>/<machine>/record``."""
        return f"{prefix}/{self.site}/{self.agent}/{self.machine}/record"


_ADAPTER: TypeAdapter[Record] = TypeAdapter(Record)


def _plain(v: Any) -> Any:
    """asdict's output with tuples as lists (JSON arrays)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


SHOWN_ERRORS = 3
"""Field errors named in one message; the rest are counted."""


def _describe(exc: ValidationError) -> str:
    """pydantic's errors as ``record field a.b: message``; JSON syntax errors as such. Another
    schema is named as such rather than as a list of every field it lacks."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return f"not JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}"
    if errors and not errors[0]["loc"]:
        return f"the payload is not a record: {errors[0]['msg']}"
    for e in errors:
        if e["loc"] == ("schema",) and e["type"] == "literal_error":
            return f"record field schema: unknown schema {str(e['input'])[:80]!r} (this reads {SCHEMA!r})"
    lines = [f"record field {line}" for line in format_validation(exc).split("; ")]
    more = f"; and {len(lines) - SHOWN_ERRORS} more" if len(lines) > SHOWN_ERRORS else ""
    return "; ".join(lines[:SHOWN_ERRORS]) + more


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON of plain JSON values, UTF-8. RecordError for what JSON
    cannot carry exactly (NaN, infinities, integers beyond 2^53, non-string keys)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise RecordError(f"cannot be written as canonical JSON: {exc}") from exc
