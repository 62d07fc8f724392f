"""Records: frozen, typed objects, the only way code reads or builds a record.

Every stretch of a machine's time becomes one record in its chain:

- a **job record** (schema ``energy-agent.job-record/2``) for each job the CNC ran;
- an **interval record** (schema ``energy-agent.interval-record/1``) for the time between
  jobs: ``idle`` when the CNC was observed and ran no job, ``unobserved`` when jobs could not
  be observed (the CNC unreachable or its signals Bad, the agent not running).

Records of schema ``energy-agent.job-record/1`` (written before the interval records existed)
are still read, verified and delivered as they are (:class:`JobRecordV1`).

The JSON form is the evidence (README "Records"): field names and nesting are fixed, and the
canonical form (RFC 8785, the ``rfc8785`` package) is produced in one place,
:meth:`Recordish.canonical`. ``hash`` is SHA-256 of the canonical JSON of the record without
``hash`` and ``proof``; ``prev_hash`` is the previous record's hash on the same machine;
``proof`` (when signed) is a W3C Data Integrity proof over the record without ``proof``.

:func:`parse_record` reads a record from JSON (a payload, a ledger row, a bundle) strictly: a
missing or extra field, a wrong type (a string where a number belongs, 2.0 where an integer
belongs, true for a number), a non-finite number, a malformed id or time raises
:class:`RecordError` naming the field, e.g. ``record field energy.kwh: Input should be a valid
number``. JSON integers are accepted where floats belong (canonical JSON writes 1.0 as 1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Any, Final, Literal, TypeVar

import rfc8785
from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from energy_agent.core.errors import RecordError
from energy_agent.core.states import STATES
from energy_agent.core.validation import format_validation

SCHEMA_JOB: Final = "energy-agent.job-record/2"
SCHEMA_INTERVAL: Final = "energy-agent.interval-record/1"
SCHEMA_JOB_V1: Final = "energy-agent.job-record/1"
SCHEMAS = (SCHEMA_JOB, SCHEMA_INTERVAL, SCHEMA_JOB_V1)
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
Method = Literal["counter", "power", "mixed", "none"]


# ---------------------------------------------------------------------------- parts


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
    """The energy of a record's window. ``kwh`` is None when it could not be measured at all
    (no usable counter delta or power for any part of the window: ``unknown_reason`` says why);
    it is never written as 0 for unknown."""

    __pydantic_config__ = _STRICT
    kwh: float | None
    estimated_kwh: float | None
    """The part of ``kwh`` from power integration rather than counter deltas."""
    method: Method
    by_state: ByState | None
    unknown_reason: Text | None

    def __post_init__(self) -> None:
        known = self.kwh is not None
        if known != (self.method != "none"):
            raise ValueError("kwh is null exactly when method is 'none'")
        if known != (self.estimated_kwh is not None) or known == (self.unknown_reason is not None):
            raise ValueError("estimated_kwh is given with kwh, unknown_reason only without it")
        if not known and self.by_state is not None:
            raise ValueError("by_state needs kwh")


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
    kgco2e: float | None
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
class Boundary:
    """How a job's start or end time is known.

    ``basis``: ``observed`` (the CNC's change was seen as it happened), ``source_timestamp``
    (placed at the time the CNC reported for a change it made while it could not be
    observed), ``estimated`` (not observed: the last observation before an outage, the first
    after it), ``agent_start`` (the job was running when observation began: the time is when
    the agent first saw it). ``reason`` says why it is not ``observed``.
    """

    __pydantic_config__ = _STRICT
    basis: Literal["observed", "source_timestamp", "estimated", "agent_start"]
    reason: Text | None


OBSERVED = Boundary("observed", None)


@dataclass(frozen=True, slots=True)
class Boundaries:
    __pydantic_config__ = _STRICT
    start: Boundary
    end: Boundary


@dataclass(frozen=True, slots=True)
class Proof:
    """A W3C Data Integrity proof (``DataIntegrityProof``, cryptosuite ``eddsa-jcs-2022``) over
    the record without ``proof`` (energy_agent.records.proofs makes and checks it)."""

    __pydantic_config__ = _STRICT
    type: Literal["DataIntegrityProof"]
    cryptosuite: Literal["eddsa-jcs-2022"]
    created: Stamp
    verificationMethod: Text
    proofPurpose: Literal["assertionMethod"]
    proofValue: Text


@dataclass(frozen=True, slots=True)
class JobRef:
    """What the job was: its key (job id, else program), what it made and why it ended."""

    __pydantic_config__ = _STRICT
    key: Text
    job_id: Text | None
    program: Text | None
    product: Text | None
    serials: tuple[Text, ...]
    """Serial numbers of what the job made (one per part when known; empty when none given)."""
    subassembly: Text | None
    order: Text | None
    """The work order the job belongs to, when one was assigned."""
    assignment: Literal["cnc", "order", "program"] | None
    """Where product, serials and subassembly came from (None: nowhere)."""
    parts: int | None
    """Parts counted by the CNC's parts counter during the job (None: no counter, or not observed)."""
    end_reason: Text


@dataclass(frozen=True, slots=True)
class IntervalRef:
    """What an interval between jobs was."""

    __pydantic_config__ = _STRICT
    kind: Literal["idle", "unobserved"]
    reason: Text | None
    """Why it is unobserved (``cnc_unavailable``, ``cnc_bad_status``, ``agent_not_running``),
    or why an idle interval ended (``job_started``, ``period``, ``cnc_unavailable`` ...)."""
    parts: int | None
    """Parts counted by the CNC's parts counter during the interval: more than 0 in an
    unobserved interval means jobs ran that no record describes."""


# ---------------------------------------------------------------------------- records


R = TypeVar("R", bound="Recordish")


class Recordish:
    """What every record type can do (a mixin: the fields are the dataclasses' own)."""

    __slots__ = ()
    schema: str
    record_id: str
    site: str
    agent: str
    machine: str
    seq: int
    start: str
    end: str
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values (dicts, lists, str, int, float, None); an unsigned
        record has no ``proof`` member."""
        out: dict[str, Any] = _plain(asdict(self))  # type: ignore[call-overload]
        if out.get("proof", 0) is None:
            del out["proof"]
        return out

    def canonical(self) -> bytes:
        """RFC 8785 canonical JSON (UTF-8): what is stored, published, hashed and signed."""
        return canonical_json(self.to_json())

    def unsigned(self) -> dict[str, Any]:
        """The JSON form without ``proof``: the document a proof signs."""
        out = self.to_json()
        out.pop("proof", None)
        return out

    def body_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the record without ``hash`` and ``proof``."""
        body = self.unsigned()
        del body["hash"]
        return hashlib.sha256(canonical_json(body)).hexdigest()

    def with_hash(self: R) -> R:
        """This record with ``hash`` set from its content."""
        return replace(self, hash=self.body_hash())  # type: ignore[type-var]

    def topic(self, prefix: str) -> str:
        """The MQTT topic of this record: ``<prefix>/<site>/<agent>/<machine>/record``."""
        return f"{prefix}/{self.site}/{self.agent}/{self.machine}/record"


@dataclass(frozen=True, slots=True)
class JobRecord(Recordish):
    """One finished job's process-level emission record."""

    __pydantic_config__ = _STRICT
    schema: Literal["energy-agent.job-record/2"]
    record_id: Hex32
    site: Ident
    agent: Ident
    machine: Ident
    seq: int
    job: JobRef
    start: Stamp
    end: Stamp
    duration_s: float
    boundaries: Boundaries
    energy: Energy
    emissions: Emissions
    quality: Quality
    meter: MeterRef
    cnc: CncRef | None
    allocation: Literal["direct"]
    provenance: Provenance
    prev_hash: Hex64
    hash: Hex64
    proof: Proof | None = None

    def __post_init__(self) -> None:
        _consistent(self.energy, self.emissions)
        if self.energy.kwh is not None and self.energy.by_state is None:
            raise ValueError("energy.by_state: a job's energy is split by state")


@dataclass(frozen=True, slots=True)
class IntervalRecord(Recordish):
    """A machine's energy between jobs (idle) or while jobs could not be observed."""

    __pydantic_config__ = _STRICT
    schema: Literal["energy-agent.interval-record/1"]
    record_id: Hex32
    site: Ident
    agent: Ident
    machine: Ident
    seq: int
    interval: IntervalRef
    start: Stamp
    end: Stamp
    duration_s: float
    energy: Energy
    emissions: Emissions
    quality: Quality
    meter: MeterRef
    cnc: CncRef | None
    provenance: Provenance
    prev_hash: Hex64
    hash: Hex64
    proof: Proof | None = None

    def __post_init__(self) -> None:
        _consistent(self.energy, self.emissions)
        if self.energy.kwh is not None and (self.energy.by_state is None) != (self.interval.kind == "unobserved"):
            raise ValueError("energy.by_state: given for idle intervals, null for unobserved ones (states unknown)")


def _consistent(energy: Energy, emissions: Emissions) -> None:
    if (energy.kwh is None) != (emissions.kgco2e is None):
        raise ValueError("emissions.kgco2e is null exactly when energy.kwh is")


# -- schema 1 (read only) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRefV1:
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
class EnergyV1:
    __pydantic_config__ = _STRICT
    kwh: float
    estimated_kwh: float
    method: Method
    by_state: ByState


@dataclass(frozen=True, slots=True)
class EmissionsV1:
    __pydantic_config__ = _STRICT
    kgco2e: float
    factor: Factor


@dataclass(frozen=True, slots=True)
class JobRecordV1(Recordish):
    """A job record written before interval records and signatures (read, verified and
    delivered as it is; never written any more)."""

    __pydantic_config__ = _STRICT
    schema: Literal["energy-agent.job-record/1"]
    record_id: Hex32
    site: Ident
    agent: Ident
    machine: Ident
    seq: int
    job: JobRefV1
    start: Stamp
    end: Stamp
    duration_s: float
    energy: EnergyV1
    emissions: EmissionsV1
    quality: Quality
    meter: MeterRef
    cnc: CncRef | None
    allocation: Literal["direct"]
    provenance: Provenance
    prev_hash: Hex64
    hash: Hex64


Record = JobRecord | IntervalRecord | JobRecordV1
"""Any record a ledger, a broker or a bundle may hold."""

_ADAPTER: TypeAdapter[Record] = TypeAdapter(
    Annotated[JobRecord | IntervalRecord | JobRecordV1, Field(discriminator="schema")])


def parse_record(data: bytes | str | dict[str, Any]) -> Record:
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
    for e in errors:
        if e["type"] == "union_tag_not_found":
            return "record field schema: Field required"
        if e["type"] == "union_tag_invalid":
            got = (e.get("ctx") or {}).get("tag")
            return f"record field schema: unknown schema {str(got)[:80]!r} (this reads {', '.join(SCHEMAS)})"
    if errors and not errors[0]["loc"]:
        return f"the payload is not a record: {errors[0]['msg']}"
    lines = [f"record field {_strip_tag(line)}" for line in format_validation(exc).split("; ")]
    more = f"; and {len(lines) - SHOWN_ERRORS} more" if len(lines) > SHOWN_ERRORS else ""
    return "; ".join(lines[:SHOWN_ERRORS]) + more


def _strip_tag(line: str) -> str:
    """'energy-agent.job-record/2.energy.kwh: …' (pydantic names the union member) -> 'energy.kwh: …'."""
    for schema in SCHEMAS:
        if line.startswith(schema + "."):
            return line[len(schema) + 1:]
    return line


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON of plain JSON values, UTF-8. RecordError for what JSON
    cannot carry exactly (NaN, infinities, integers beyond 2^53, non-string keys)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise RecordError(f"cannot be written as canonical JSON: {exc}") from exc
