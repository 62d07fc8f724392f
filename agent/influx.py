"""Records as InfluxDB points, and writers for the v1 ``/write`` and v2 APIs.

One point per record: measurement ``job_energy``; timestamp = job start in ns; tags are the
dimensions LCA teams group by; fields carry the values (see README, "InfluxDB"). The point's
identity (measurement, tags, timestamp) depends only on the record, so writing a record twice
overwrites its own point. Numbers are written with fixed types (floats as floats even when the
JSON carried ``1``), so a series never meets a field-type conflict.
"""

from __future__ import annotations

import asyncio
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
        raise RecordError(f"record field {path!r} must be {names}, not {type(cur).__name__}")
    return cur


def _ns(iso: str, field: str) -> int:
    try:
        dt = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise RecordError(f"record field {field!r}: {iso!r} is not a UTC time like 2026-01-31T12:00:00.000000Z") from None
    d = dt - _EPOCH
    return (d.days * 86400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000


def record_to_point(rec: Any, measurement: str = "job_energy") -> Point:
    """Validate a record (as parsed from JSON) and build its point; RecordError names the field."""
    if not isinstance(rec, dict):
        raise RecordError("payload is not a JSON object")
    schema = rec.get("schema")
    if schema != SCHEMA:
        raise RecordError(f"unknown schema {schema!r} (this bridge reads {SCHEMA!r})")
    num = (int, float)
    p = Point(measurement).time(_ns(_get(rec, "start", str), "start"), WritePrecision.NS)
    for tag in TAGS:
        path = tag if tag in ("site", "agent", "machine") else f"job.{tag}"
        v = _get(rec, path, str, optional=tag not in ("site", "agent", "machine"))
        if v:
            p = p.tag(tag, v)
    p = p.field("record_id", _get(rec, "record_id", str))
    job_id = _get(rec, "job.job_id", str, optional=True)
    p = p.field("job_id", job_id or _get(rec, "job.key", str))
    p = p.field("seq", int(_get(rec, "seq", int)))
    p = p.field("kwh", float(_get(rec, "energy.kwh", num)))
    for s in states.STATES:
        p = p.field(f"kwh_{s}", float(_get(rec, f"energy.by_state.{s}", num)))
    p = p.field("estimated_kwh", float(_get(rec, "energy.estimated_kwh", num)))
    p = p.field("method", _get(rec, "energy.method", str))
    p = p.field("kgco2e", float(_get(rec, "emissions.kgco2e", num)))
    p = p.field("factor", float(_get(rec, "emissions.factor.value", num)))
    p = p.field("factor_id", _get(rec, "emissions.factor.id", str))
    p = p.field("duration_s", float(_get(rec, "duration_s", num)))
    p = p.field("end_ns", _ns(_get(rec, "end", str), "end"))
    p = p.field("coverage", float(_get(rec, "quality.coverage", num)))
    p = p.field("gap_count", int(_get(rec, "quality.gap_count", int)))
    p = p.field("longest_gap_s", float(_get(rec, "quality.longest_gap_s", num)))
    p = p.field("counter_resets", int(_get(rec, "quality.counter_resets", int)))
    p = p.field("hash", _get(rec, "hash", str))
    return p


class InfluxWriter:
    """Writes points; ``DeliveryError`` says what the server answered."""

    @staticmethod
    def from_config(cfg) -> "InfluxWriter":
        return V1Writer(cfg) if cfg.api == "v1" else V2Writer(cfg)

    async def write(self, points: list[Point]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class V1Writer(InfluxWriter):
    """InfluxDB 1.x: POST /write?db=…&precision=ns with line protocol."""

    def __init__(self, cfg):
        params = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        self.url = f"{cfg.url.rstrip('/')}/write?{urllib.parse.urlencode(params)}"
        self.timeout = cfg.timeout_s

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "text/plain; charset=utf-8"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                if resp.status != 204:
                    raise DeliveryError(f"InfluxDB {self.url}: HTTP {resp.status}")
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"InfluxDB {self.url}: HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryError(f"InfluxDB {self.url}: {getattr(exc, 'reason', exc)}") from None

    async def write(self, points: list[Point]) -> None:
        body = "\n".join(p.to_line_protocol() for p in points).encode()
        await asyncio.to_thread(self._post, body)


class V2Writer(InfluxWriter):
    """InfluxDB 2.x API (also VictoriaMetrics): influxdb-client, synchronous writes in a thread."""

    def __init__(self, cfg):
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        token = os.environ.get(cfg.token_env, "") if cfg.token_env else ""
        self.client = InfluxDBClient(url=cfg.url, token=token, org=cfg.org, timeout=int(cfg.timeout_s * 1000))
        self.api = self.client.write_api(write_options=SYNCHRONOUS)
        self.bucket, self.org, self.url = cfg.bucket, cfg.org, cfg.url

    def _write(self, points: list[Point]) -> None:
        from influxdb_client.rest import ApiException

        try:
            self.api.write(bucket=self.bucket, org=self.org, record=points, write_precision=WritePrecision.NS)
        except ApiException as exc:
            raise DeliveryError(f"InfluxDB v2 {self.url}: HTTP {exc.status}: {str(exc.body)[:300]}") from None
        except Exception as exc:  # urllib3 connection errors and the like
            raise DeliveryError(f"InfluxDB v2 {self.url}: {type(exc).__name__}: {exc}") from None

    async def write(self, points: list[Point]) -> None:
        await asyncio.to_thread(self._write, points)

    def close(self) -> None:
        self.client.close()
