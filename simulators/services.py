"""Real local services for tests and the demo: Mosquitto, InfluxDB 1.x and VictoriaMetrics.

Each is started from its Debian package's binary with a config file of its own, listening only
on a free port on 127.0.0.1, with its data in a directory we own; nothing runs as a system
service. ``stop()`` ends the process by its id (SIGTERM, then SIGKILL). A missing binary is
an error naming the Debian package, never a reason to skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGES = {"mosquitto": "mosquitto", "influxd": "influxdb", "victoria-metrics": "victoria-metrics"}
SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin")


class ServiceError(RuntimeError):
    pass


def require(binary: str) -> str:
    """Path of a service binary, or an error saying which Debian package installs it."""
    path = shutil.which(binary) or next((f"{d}/{binary}" for d in SEARCH if os.access(f"{d}/{binary}", os.X_OK)), None)
    if path is None:
        pkg = PACKAGES.get(binary, binary)
        raise ServiceError(f"{binary} not found: install the Debian package '{pkg}' (apt-get install -y {pkg})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Service:
    binary = ""
    name = ""

    def __init__(self) -> None:
        self.port = 0
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    # subclass hooks
    def _configure(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, workdir: Path, timeout: float = 30.0) -> "Service":
        binary = require(self.binary)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        argv = [binary, *self._configure()]
        self.log = self.workdir / f"{self.name}.log"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self._ready():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} did not answer on 127.0.0.1:{self.port} within {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log else ""
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        assert self.workdir is not None
        self.stop()
        self.start(self.workdir)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Mosquitto(Service):
    binary = "mosquitto"
    name = "mosquitto"

    def __init__(self, *, persistence: bool = True, extra: str = "") -> None:
        super().__init__()
        self.persistence = persistence
        self.extra = extra

    def _configure(self) -> list[str]:
        assert self.workdir is not None
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"persistence {'true' if self.persistence else 'false'}\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + self.extra
        )
        return ["-c", str(conf)]

    def _ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True


class InfluxDB1(Service):
    """InfluxDB 1.x (Debian 1.6.7): v1 ``/write`` and ``/query``."""

    binary = "influxd"
    name = "influxdb"

    def __init__(self) -> None:
        super().__init__()
        self.rpc_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _configure(self) -> list[str]:
        assert self.workdir is not None
        if not self.rpc_port:
            self.rpc_port = free_port()
        d = self.workdir
        conf = d / "influxdb.conf"
        conf.write_text(
            f'reporting-disabled = true\nbind-address = "127.0.0.1:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{d}/meta"\n'
            f'[data]\n  dir = "{d}/data"\n  wal-dir = "{d}/wal"\n  query-log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
            f'[http]\n  enabled = true\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            "[continuous_queries]\n  enabled = false\n"
        )
        return ["-config", str(conf)]

    def _ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/ping", timeout=1.0)
        return status == 204

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"', method="POST")

    def query(self, q: str, db: str | None = None, method: str = "GET") -> list[dict]:
        """Run InfluxQL; rows of the first series set as dicts (``time`` in ns)."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        url = f"{self.url}/query?{urllib.parse.urlencode(params)}"
        status, body = _http(method, url, body=b"" if method == "POST" else None)
        if status != 200:
            raise ServiceError(f"InfluxQL {q!r}: HTTP {status}: {body[:300]!r}")
        rows: list[dict] = []
        for result in json.loads(body).get("results", []):
            if "error" in result:
                raise ServiceError(f"InfluxQL {q!r}: {result['error']}")
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series["values"]:
                    rows.append({**tags, **dict(zip(series["columns"], values))})
        return rows


class VictoriaMetrics(Service):
    """VictoriaMetrics (Debian 1.79.5): influxdb-client v2 writes at ``/api/v2/write``."""

    binary = "victoria-metrics"
    name = "victoria-metrics"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _configure(self) -> list[str]:
        assert self.workdir is not None
        return [f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.workdir}/data",
                "-retentionPeriod=100y", "-search.latencyOffset=0s", "-loggerLevel=WARN"]

    def _ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/health", timeout=1.0)
        return status == 200

    def force_flush(self) -> None:
        _http("GET", f"{self.url}/internal/force_flush")

    def export(self, match: str = '{__name__=~".+"}') -> list[dict]:
        """Series as exported by /api/v1/export: dicts with metric, values, timestamps (ms)."""
        url = f"{self.url}/api/v1/export?{urllib.parse.urlencode({'match[]': match, 'start': '0'})}"
        status, body = _http("GET", url)
        if status != 200:
            raise ServiceError(f"export {match}: HTTP {status}: {body[:300]!r}")
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]
