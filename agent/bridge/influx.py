"""Writers for the InfluxDB v1 ``/write`` and v2 APIs: lines of line protocol in one request.

A server that rejects a write answers :class:`WriteRejected` (the points are at fault: do not
retry them as they are); every other failure is a :class:`DeliveryError` worth retrying.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.parse
import urllib.request

from energy_agent.core.errors import DeliveryError

_REJECTED = (400, 413, 422)
"""HTTP statuses that blame the points (bad line protocol, type conflict, too large), not the server."""


class WriteRejected(DeliveryError):
    """The server refused the points themselves (HTTP 400/413/422): retrying them unchanged cannot succeed."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class InfluxWriter:
    """Writes points. :class:`WriteRejected` when the server blames the points, DeliveryError otherwise."""

    @staticmethod
    def from_config(cfg) -> InfluxWriter:
        """A writer for an ``InfluxConfig``: api v1 → POST /write, v2 → influxdb-client."""
        if cfg.api == "v1":
            return V1Writer(cfg)
        if cfg.api == "v2":
            return V2Writer(cfg)
        raise ValueError(f"unknown InfluxDB api {cfg.api!r}")

    target = ""

    async def write(self, lines: list[bytes]) -> None:
        """Write lines of line protocol (``lineproto.record_line``) in one request."""
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
                raise WriteRejected(msg, exc.code) from exc
            raise DeliveryError(msg) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryError(f"{self.target}: {getattr(exc, 'reason', None) or exc}") from exc

    async def write(self, lines: list[bytes]) -> None:
        if lines:
            await asyncio.to_thread(self._post, b"\n".join(lines))


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

    def _write(self, lines: list[bytes]) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            self.api.write(bucket=self.bucket, org=self.org, record=b"\n".join(lines),
                           write_precision=WritePrecision.NS)
        except ApiException as exc:
            body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or exc.reason)
            msg = f"{self.target}: HTTP {exc.status}: {body[:500].strip()}"
            if exc.status in _REJECTED:
                raise WriteRejected(msg, exc.status) from exc
            raise DeliveryError(msg) from exc
        except Exception as exc:
            raise DeliveryError(f"{self.target}: {type(exc).__name__}: {exc}") from exc

    async def write(self, lines: list[bytes]) -> None:
        if lines:
            await asyncio.to_thread(self._write, lines)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
