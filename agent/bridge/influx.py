"""Records as InfluxDB points, and writers for the InfluxDB v1 ``/write`` and v2 APIs.

One point per record (docs/CONTRACTS.md, "InfluxDB point"): measurement ``job_energy``
(configurable); timestamp = job start in ns; tags ``site, agent, machine, program, product,
subassembly, serial`` where non-empty; fields ``record_id, job_id, seq, kwh, kwh_<state>...,
estimated_kwh, kgco2e, factor, factor_id, duration_s, end_ns, coverage, gap_count,
longest_gap_s, counter_resets, method, hash``. The point's identity (measurement, tags,
timestamp) depends only on the record, so writing a record twice overwrites its own point.
Numbers are written with fixed types (floats as floats even when the JSON carried ``1``,
integers as integers), so a series never meets a field-type conflict.

:func:`record_to_point` validates what it reads and raises :class:`RecordError` naming the
field, so that nothing the server would reject (NaN, a 2^70 integer, a year-3000 timestamp)
gets as far as a write. :func:`record_to_line` gives the same point as line protocol bytes,
several times faster (what the bridge writes). A server that rejects a write anyway answers
:class:`WriteRejected` (the points are at fault: do not retry them as they are); every other
failure is a :class:`DeliveryError` worth retrying.
"""

from __future__ import annotations

import asyncio
import functools
import math
import operator
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from datetime import date, datetime, timezone
from typing import Any

from influxdb_client import Point, WritePrecision

from energy_agent.core import states
from energy_agent.core.errors import DeliveryError, RecordError
from energy_agent.records.record import SCHEMA

TAGS = ("site", "agent", "machine", "program", "product", "subassembly", "serial")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_INT64 = 2**63
# InfluxDB stores int64 nanoseconds: 1677-09-21 .. 2262-04-11.
_MIN_NS, _MAX_NS = -(2**63) + 2, 2**63 - 2
_MAX_STR = 4096
"""Longest string accepted in a tag or string field (InfluxDB allows 64 KiB; no record needs this many)."""
_REJECTED = (400, 413, 422)
"""HTTP statuses that blame the points (bad line protocol, type conflict, too large), not the server."""


class WriteRejected(DeliveryError):
    """The server refused the points themselves (HTTP 400/413/422): retrying them unchanged cannot succeed."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _get(rec: dict, path: str, kind: type | tuple, optional: bool = False) -> Any:
    cur: Any = rec
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise RecordError(f"record field {path!r} is missing")
        cur = cur[part]
    if cur is None and optional:
        return None
    if isinstance(cur, bool) or not isinstance(cur, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        got = "null" if cur is None else type(cur).__name__
        raise RecordError(f"record field {path!r} must be {names}, not {got}")
    if isinstance(cur, str):
        if len(cur) > _MAX_STR:
            raise RecordError(f"record field {path!r} is longer than {_MAX_STR} characters")
        try:
            cur.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
            raise RecordError(f"record field {path!r} is not valid Unicode text") from None
    return cur


def _float(rec: dict, path: str) -> float:
    v = _get(rec, path, (int, float))
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise RecordError(f"record field {path!r} must be a finite number, not {v!r}")
    return f


def _int(rec: dict, path: str, minimum: int = 0) -> int:
    v = _get(rec, path, int)
    if not minimum <= v < _INT64:
        raise RecordError(f"record field {path!r} must be an integer in [{minimum}, 2^63), not {v}")
    return v


def _ns(rec: dict, path: str) -> int:
    iso = _get(rec, path, str)
    try:
        dt = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise RecordError(f"record field {path!r}: {iso[:64]!r} is not a UTC time like 2026-01-31T12:00:00.000000Z") from None
    d = dt - _EPOCH
    ns = (d.days * 86400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000
    if not _MIN_NS <= ns <= _MAX_NS:
        raise RecordError(f"record field {path!r}: {iso!r} is outside what InfluxDB can store (1677..2262)")
    return ns


def record_to_point(rec: Any, measurement: str = "job_energy") -> Point:
    """Validate a record (as parsed from JSON) and build its point; RecordError names the field."""
    if not isinstance(rec, dict):
        raise RecordError(f"the payload is not a JSON object but {'null' if rec is None else type(rec).__name__}")
    schema = rec.get("schema")
    if schema != SCHEMA:
        raise RecordError(f"record field 'schema': unknown schema {str(schema)[:80]!r} (this bridge reads {SCHEMA!r})")
    p = Point(measurement).time(_ns(rec, "start"), WritePrecision.NS)
    for tag in TAGS:
        required = tag in ("site", "agent", "machine")
        v = _get(rec, tag if required else f"job.{tag}", str, optional=not required)
        if required and not v:
            raise RecordError(f"record field {tag!r} is empty")
        if v:
            p.tag(tag, v)
    p.field("record_id", _get(rec, "record_id", str))
    # job_id is null for jobs the CNC gave no id; the job key (always set) stands in for it.
    p.field("job_id", _get(rec, "job.job_id", str, optional=True) or _get(rec, "job.key", str))
    p.field("seq", _int(rec, "seq"))
    p.field("kwh", _float(rec, "energy.kwh"))
    for s in states.STATES:
        p.field(f"kwh_{s}", _float(rec, f"energy.by_state.{s}"))
    p.field("estimated_kwh", _float(rec, "energy.estimated_kwh"))
    p.field("kgco2e", _float(rec, "emissions.kgco2e"))
    p.field("factor", _float(rec, "emissions.factor.value"))
    p.field("factor_id", _get(rec, "emissions.factor.id", str))
    p.field("duration_s", _float(rec, "duration_s"))
    p.field("end_ns", _ns(rec, "end"))
    p.field("coverage", _float(rec, "quality.coverage"))
    p.field("gap_count", _int(rec, "quality.gap_count"))
    p.field("longest_gap_s", _float(rec, "quality.longest_gap_s"))
    p.field("counter_resets", _int(rec, "quality.counter_resets"))
    p.field("method", _get(rec, "energy.method", str))
    p.field("hash", _get(rec, "hash", str))
    return p


def point_time_ns(point: Point) -> int:
    """The point's timestamp in ns (as built by record_to_point)."""
    return int(point._time)


# ---------------------------------------------------------------------- line protocol, fast path
#
# The bridge lands thousands of records a second; building a Point per record and having it
# sorted, typed and escaped costs more than the rest of the bridge together. record_to_line
# writes the same bytes directly: tags and fields in the order Point sorts them into, the
# escaping tables of influxdb_client, floats as Point formats them. It only takes records that
# are plainly valid; anything else (a missing field, a wrong type, an unusual timestamp) goes
# through record_to_point, so the accepted records, the output and every error message stay
# exactly those of the Point path (tests compare the two).

_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})
_STAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})Z", re.ASCII)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_FLOAT_FIELDS = ("kwh", "estimated_kwh", "kgco2e", "factor", "duration_s", "coverage", "longest_gap_s",
                 *(f"kwh_{s}" for s in states.STATES))
_STR_FIELDS = ("record_id", "job_id", "factor_id", "method", "hash")
_INT_FIELDS = ("seq", "gap_count", "counter_resets", "end_ns")
_KINDS = dict.fromkeys(_FLOAT_FIELDS, "{}") | dict.fromkeys(_STR_FIELDS, '"{}"') | dict.fromkeys(_INT_FIELDS, "{}i")
_FIELDS_TEMPLATE = " " + ",".join(f"{name}={_KINDS[name]}" for name in sorted(_KINDS)) + " {}"
"""' <fields> <timestamp>' with the fields in the order Point writes them (sorted by name)."""
_IN_FIELD_ORDER = operator.itemgetter(*(list(_KINDS).index(name) for name in sorted(_KINDS)))
"""Values in the order of _KINDS (floats, strings, integers) -> in the order of the template."""


@functools.lru_cache(maxsize=8)
def _head(measurement: str) -> str:
    return measurement.translate(_ESCAPE_MEASUREMENT)


def _fast_ns(iso: Any) -> int | None:
    """ns of a ``2026-01-31T12:00:00.000000Z`` stamp, None for anything else (the slow path judges it)."""
    m = _STAMP.fullmatch(iso) if type(iso) is str else None
    if m is None:
        return None
    y, mo, d, h, mi, s, us = map(int, m.groups())
    if h > 23 or mi > 59 or s > 59:
        return None
    try:
        days = date(y, mo, d).toordinal() - _EPOCH_DAY
    except ValueError:
        return None
    ns = (((days * 86400 + h * 3600 + mi * 60 + s) * 1_000_000) + us) * 1000
    return ns if _MIN_NS <= ns <= _MAX_NS else None


def _fast_line(rec: Any, head: str) -> bytes | None:
    """The line of a plainly valid record, else None. Raises only KeyError/TypeError on odd shapes."""
    if type(rec) is not dict or rec.get("schema") != SCHEMA:
        return None
    job, energy, emissions, quality = rec["job"], rec["energy"], rec["emissions"], rec["quality"]
    by_state, factor = energy["by_state"], emissions["factor"]
    line = head
    for prefix, v, required in ((",agent=", rec["agent"], True), (",machine=", rec["machine"], True),
                                (",product=", job["product"], False), (",program=", job["program"], False),
                                (",serial=", job["serial"], False), (",site=", rec["site"], True),
                                (",subassembly=", job["subassembly"], False)):
        if type(v) is not str:
            if v is None and not required:
                continue
            return None
        if not v:
            if required:
                return None
            continue
        if len(v) > _MAX_STR:
            return None
        v = v.translate(_ESCAPE_KEY)
        line += prefix + (v + " " if v[-1] == "\\" else v)
    values = []
    for v in (energy["kwh"], energy["estimated_kwh"], emissions["kgco2e"], factor["value"], rec["duration_s"],
              quality["coverage"], quality["longest_gap_s"], *[by_state[s] for s in states.STATES]):
        if type(v) is not float:
            if type(v) is not int or not -_INT64 < v < _INT64:
                return None
            v = float(v)
        if v - v:  # inf or nan
            return None
        v = repr(v)
        values.append(v[:-2] if v.endswith(".0") else v)
    job_id = job["job_id"]
    if job_id is None or job_id == "":
        job_id = job["key"]
    for v in (rec["record_id"], job_id, factor["id"], energy["method"], rec["hash"]):
        if type(v) is not str or len(v) > _MAX_STR:
            return None
        values.append(v.translate(_ESCAPE_STRING))
    for v in (rec["seq"], quality["gap_count"], quality["counter_resets"]):
        if type(v) is not int or not 0 <= v < _INT64:
            return None
        values.append(v)
    start, end = _fast_ns(rec["start"]), _fast_ns(rec["end"])
    if start is None or end is None:
        return None
    values.append(end)
    line += _FIELDS_TEMPLATE.format(*_IN_FIELD_ORDER(values), start)
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape, in some field
        return None


def record_to_line(rec: Any, measurement: str = "job_energy") -> bytes:
    """The record's point as one line of line protocol (UTF-8, no newline): exactly
    ``record_to_point(rec, measurement).to_line_protocol()``, with the same RecordErrors, faster."""
    try:
        line = _fast_line(rec, _head(measurement))
    except (KeyError, TypeError):
        line = None
    if line is None:
        line = record_to_point(rec, measurement).to_line_protocol().encode("utf-8")
    return line


def _line(point: bytes | Point) -> bytes:
    return point if isinstance(point, bytes) else point.to_line_protocol().encode("utf-8")


class InfluxWriter:
    """Writes points. :class:`WriteRejected` when the server blames the points, DeliveryError otherwise."""

    @staticmethod
    def from_config(cfg) -> "InfluxWriter":
        """A writer for an ``InfluxConfig``: api v1 → POST /write, v2 → influxdb-client."""
        if cfg.api == "v1":
            return V1Writer(cfg)
        if cfg.api == "v2":
            return V2Writer(cfg)
        raise ValueError(f"unknown InfluxDB api {cfg.api!r}")

    target = ""

    async def write(self, points: list[bytes | Point]) -> None:
        """Write points: lines from :func:`record_to_line` (or Points) in one request."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class V1Writer(InfluxWriter):
    """InfluxDB 1.x: POST {url}/write?db=…&rp=…&precision=ns with line protocol (urllib, in a thread)."""

    def __init__(self, cfg):
        params = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        self.url = f"{cfg.url.rstrip('/')}/write?{urllib.parse.urlencode(params)}"
        self.target = f"InfluxDB {cfg.url} db {cfg.database}"
        self.timeout = cfg.timeout_s

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "text/plain; charset=utf-8"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
                if resp.status != 204:
                    raise DeliveryError(f"{self.target}: HTTP {resp.status} (expected 204)")
        except urllib.error.HTTPError as exc:
            try:
                text = exc.read()[:500].decode(errors="replace").strip()
            except OSError:
                text = ""
            msg = f"{self.target}: HTTP {exc.code}: {text}"
            if exc.code in _REJECTED:
                raise WriteRejected(msg, exc.code) from None
            raise DeliveryError(msg) from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryError(f"{self.target}: {getattr(exc, 'reason', None) or exc}") from None

    async def write(self, points: list[bytes | Point]) -> None:
        if not points:
            return
        body = b"\n".join(_line(p) for p in points)
        await asyncio.to_thread(self._post, body)


class V2Writer(InfluxWriter):
    """InfluxDB 2.x API (also VictoriaMetrics): influxdb-client, synchronous writes in a thread.

    The token comes from the environment variable named by ``token_env`` ("" when unset).
    """

    def __init__(self, cfg):
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        token = os.environ.get(cfg.token_env, "") if cfg.token_env else ""
        self.client = InfluxDBClient(url=cfg.url, token=token, org=cfg.org, timeout=int(cfg.timeout_s * 1000))
        self.api = self.client.write_api(write_options=SYNCHRONOUS)
        self.bucket, self.org = cfg.bucket, cfg.org
        self.target = f"InfluxDB v2 {cfg.url} bucket {cfg.bucket}"

    def _write(self, points: list[bytes | Point]) -> None:
        from influxdb_client.rest import ApiException

        try:
            self.api.write(bucket=self.bucket, org=self.org, record=b"\n".join(_line(p) for p in points),
                           write_precision=WritePrecision.NS)
        except ApiException as exc:
            body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or exc.reason)
            msg = f"{self.target}: HTTP {exc.status}: {body[:500].strip()}"
            if exc.status in _REJECTED:
                raise WriteRejected(msg, exc.status) from None
            raise DeliveryError(msg) from None
        except Exception as exc:  # noqa: BLE001 - urllib3 connection errors and the like never leave this module
            raise DeliveryError(f"{self.target}: {type(exc).__name__}: {exc}") from None

    async def write(self, points: list[bytes | Point]) -> None:
        if points:
            await asyncio.to_thread(self._write, points)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
