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
gets as far as a write. A server that rejects a write anyway answers :class:`WriteRejected`
(the points are at fault: do not retry them as they are); every other failure is a
:class:`DeliveryError` worth retrying.
"""

from __future__ import annotations

import asyncio
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Any

from influxdb_client import Point, WritePrecision

from agent import states
from agent.errors import DeliveryError, RecordError
from agent.record import SCHEMA

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

    async def write(self, points: list[Point]) -> None:
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

    async def write(self, points: list[Point]) -> None:
        if not points:
            return
        body = "\n".join(p.to_line_protocol() for p in points).encode()
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

    def _write(self, points: list[Point]) -> None:
        from influxdb_client.rest import ApiException

        try:
            self.api.write(bucket=self.bucket, org=self.org, record=points, write_precision=WritePrecision.NS)
        except ApiException as exc:
            body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or exc.reason)
            msg = f"{self.target}: HTTP {exc.status}: {body[:500].strip()}"
            if exc.status in _REJECTED:
                raise WriteRejected(msg, exc.status) from None
            raise DeliveryError(msg) from None
        except Exception as exc:  # noqa: BLE001 - urllib3 connection errors and the like never leave this module
            raise DeliveryError(f"{self.target}: {type(exc).__name__}: {exc}") from None

    async def write(self, points: list[Point]) -> None:
        if points:
            await asyncio.to_thread(self._write, points)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
