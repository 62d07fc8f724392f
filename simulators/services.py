"""Real local services for tests and the demo: Mosquitto, InfluxDB 1.x and VictoriaMetrics.

Each is started from its Debian package's binary with a config file of its own, listening only
on free ports on 127.0.0.1, with its data and log in a directory we own; nothing runs as a
system service and nothing listens on another address. ``stop()`` ends the process by its id
(SIGTERM, then SIGKILL after a grace period). ``restart()`` brings it back on the same port
with the same data. A missing binary is an error naming the Debian package, never a skip.

::

    with Mosquitto().start(workdir / "mqtt") as broker:
        ...  # broker.port

Only the standard library is used (urllib for HTTP), so the services work from any venv.
"""

from __future__ import annotations

import atexit
import getpass
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
import weakref
from pathlib import Path

PACKAGES = {"mosquitto": "mosquitto", "influxd": "influxdb", "victoria-metrics": "victoria-metrics"}
SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service binary is missing, or the service died or did not answer."""


def require(binary: str) -> str:
    """Path of a service binary, or a ServiceError naming the Debian package that installs it."""
    path = shutil.which(binary)
    if path is None:
        path = next((f"{d}/{binary}" for d in SEARCH if os.access(f"{d}/{binary}", os.X_OK)), None)
    if path is None:
        pkg = PACKAGES.get(binary, binary)
        raise ServiceError(f"{binary} not found (looked in PATH and {', '.join(SEARCH)}): "
                           f"install the Debian package '{pkg}' (apt-get install -y {pkg})")
    return path


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group of a process started in its own session (group id = its pid)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM a process started with start_new_session=True, wait, then SIGKILL; its exit code."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


_RUNNING: weakref.WeakSet[Service] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Whatever a crashed test or demo left running is stopped when the interpreter exits."""
    for svc in list(_RUNNING):
        try:
            svc.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class Service:
    """One local service process: ``start`` → answers on ``port`` → ``stop``."""

    binary = ""
    name = ""
    startup_timeout_s = 30.0

    def __init__(self) -> None:
        self.port = 0
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.started_in: float | None = None
        """Seconds from Popen to the first good answer, of the last start."""
        self.argv: list[str] = []

    # ------------------------------------------------------------------ subclass hooks

    def _configure(self) -> list[str]:
        """Write the config file(s) into workdir; return the command line arguments."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the service answers (may raise OSError while it does not)."""
        raise NotImplementedError

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _logs(self) -> list[Path]:
        assert self.workdir is not None
        return [self.workdir / f"{self.name}.out"]

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, workdir: Path | str, timeout: float | None = None) -> Service:
        """Start on free loopback port(s) (the same ones again after a stop); return when it answers."""
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        binary = require(self.binary)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        fresh = not self.port
        attempts = 3 if fresh else 1
        for attempt in range(attempts):
            if fresh:
                self._pick_ports()
            try:
                self._launch(binary, timeout or self.startup_timeout_s)
                return self
            except ServiceError as exc:
                # Another process may have taken a port between our pick and the bind.
                if attempt + 1 < attempts and "address already in use" in str(exc).lower():
                    continue
                raise
        raise AssertionError("unreachable")

    def _launch(self, binary: str, timeout: float) -> None:
        self.argv = [binary, *self._configure()]
        out = self.workdir / f"{self.name}.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "MOSQUITTO_"))}
        t0 = time.monotonic()
        with open(out, "ab") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env=env, start_new_session=True)
        _RUNNING.add(self)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} (pid {self.proc.pid}) exited with {self.proc.returncode} while "
                                   f"starting: {' '.join(self.argv)}\n{self.tail()}")
            try:
                if self._ready():
                    self.started_in = time.monotonic() - t0
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"{self.name} did not answer on {HOST}:{self.port} within {timeout:g} s: "
                                   f"{' '.join(self.argv)}\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, n: int = 25) -> str:
        """The last lines of the service's log file(s), for error messages."""
        parts = []
        for path in self._logs() if self.workdir else []:
            try:
                lines = path.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            parts.append(f"--- {path} (last {len(lines)} lines):\n" + "\n".join(lines))
        return "\n".join(parts) or "(no log output)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process by its id, wait, then SIGKILL; returns when it is gone."""
        if self.proc is not None:
            stop_process(self.proc, timeout)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        signal_group(pid, sig)

    def kill(self) -> None:
        """SIGKILL by id: a crash, for fault tests (no clean shutdown, no final save)."""
        if self.running:
            self._signal(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, timeout: float | None = None) -> Service:
        """Stop and start again on the same port(s) with the same data."""
        if self.workdir is None:
            raise ServiceError(f"{self.name} was never started")
        self.stop()
        return self.start(self.workdir, timeout)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {HOST}:{self.port} pid={self.pid} running={self.running}>"


class Mosquitto(Service):
    """Mosquitto 2.0: one listener on 127.0.0.1, anonymous, persistent, logging to a file."""

    binary = "mosquitto"
    name = "mosquitto"

    def __init__(self, *, persistence: bool = True, extra: str = "", tls: bool = False) -> None:
        super().__init__()
        self.persistence = persistence
        self.extra = extra
        """More mosquitto.conf lines, e.g. ``max_inflight_messages 20``."""
        self.tls = tls
        """The listener speaks TLS (certfile etc. in ``extra``): ready means the TLS handshake's
        TCP accept, as a plaintext MQTT CONNECT would be refused."""

    @property
    def host(self) -> str:
        return HOST

    def _logs(self) -> list[Path]:
        return [self.workdir / "mosquitto.log", *super()._logs()]

    def _configure(self) -> list[str]:
        d = self.workdir
        conf = d / "mosquitto.conf"
        conf.write_text(
            "# written by simulators/services.py for a local test broker\n"
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            # Run as root, mosquitto would switch to the 'mosquitto' user, which cannot write here.
            f"user {getpass.getuser()}\n"
            f"persistence {'true' if self.persistence else 'false'}\n"
            f"persistence_location {d}/\n"
            "persistence_file mosquitto.db\n"
            "autosave_interval 1\n"
            # Never drop what is queued for an offline persistent session (the default is 1000).
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"log_dest file {d}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
            + self.extra
        )
        return ["-c", str(conf)]

    # MQTT 3.1.1 CONNECT, clean session, empty client id, keepalive 10 s; then DISCONNECT.
    _CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 10, 0, 0])
    _DISCONNECT = bytes([0xE0, 0])

    def _ready(self) -> bool:
        """TCP connect, and an MQTT CONNACK: a bare TCP accept might be someone else on the port."""
        if self.tls:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                return True
        with socket.create_connection((HOST, self.port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(self._CONNECT)
            ack = b""
            while len(ack) < 4:
                chunk = s.recv(4 - len(ack))
                if not chunk:
                    return False
                ack += chunk
            s.sendall(self._DISCONNECT)
            return ack[:2] == bytes([0x20, 2])  # any CONNACK, "not authorised" too: a broker answers


class InfluxDB1(Service):
    """InfluxDB 1.x (Debian 1.6.7): HTTP (/ping, /write, /query) and the backup RPC port, both on 127.0.0.1.

    Graphite, collectd, OpenTSDB and UDP inputs are disabled (their defaults; also written out),
    reporting is off, and the _internal monitor database is not kept.
    """

    binary = "influxd"
    name = "influxdb"

    def __init__(self) -> None:
        super().__init__()
        self.rpc_port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.rpc_port = free_port()
        while self.rpc_port == self.port:
            self.rpc_port = free_port()

    def _configure(self) -> list[str]:
        if not self.rpc_port:
            self.rpc_port = free_port()
        d = self.workdir
        conf = d / "influxdb.conf"
        conf.write_text(
            "# written by simulators/services.py for a local test database\n"
            "reporting-disabled = true\n"
            f'bind-address = "{HOST}:{self.rpc_port}"\n'
            "[meta]\n"
            f'  dir = "{d}/meta"\n'
            "  retention-autocreate = true\n"
            "  logging-enabled = false\n"
            "[data]\n"
            f'  dir = "{d}/data"\n'
            f'  wal-dir = "{d}/wal"\n'
            "  query-log-enabled = false\n"
            "  trace-logging-enabled = false\n"
            "[coordinator]\n"
            "[retention]\n  enabled = true\n"
            "[shard-precreation]\n  enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
            "[http]\n"
            "  enabled = true\n"
            f'  bind-address = "{HOST}:{self.port}"\n'
            "  auth-enabled = false\n"
            "  log-enabled = false\n"
            "  pprof-enabled = false\n"
            "[subscriber]\n  enabled = false\n"
            "[[graphite]]\n  enabled = false\n"
            "[[collectd]]\n  enabled = false\n"
            "[[opentsdb]]\n  enabled = false\n"
            "[[udp]]\n  enabled = false\n"
            "[continuous_queries]\n  enabled = false\n"
            "[logging]\n  level = \"info\"\n"
        )
        return ["-config", str(conf)]

    def _ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/ping", timeout=1.0)
        return status == 204

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"', method="POST")

    def write(self, lines: str, db: str, precision: str = "ns") -> None:
        """Write line protocol directly (for test setup)."""
        url = f"{self.url}/write?{urllib.parse.urlencode({'db': db, 'precision': precision})}"
        status, body = _http("POST", url, lines.encode())
        if status != 204:
            raise ServiceError(f"write to {db}: HTTP {status}: {body[:300]!r}")

    def query(self, q: str, db: str | None = None, method: str | None = None) -> list[dict]:
        """Run InfluxQL; every row of every series as a dict (its tags merged in, ``time`` in ns).

        SELECT and SHOW go as GET, everything else as POST (what InfluxDB 1.x requires).
        """
        if method is None:
            method = "GET" if q.lstrip().upper().startswith(("SELECT", "SHOW")) else "POST"
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
                for values in series.get("values", []):
                    rows.append({**tags, **dict(zip(series["columns"], values))})
        return rows


class VictoriaMetrics(Service):
    """VictoriaMetrics (Debian 1.79.5): one HTTP listener on 127.0.0.1; accepts InfluxDB v1/v2 writes.

    Graphite, InfluxDB-UDP/TCP and OpenTSDB listeners are off (their defaults: empty addresses).
    VictoriaMetrics keeps every sample it is sent, also a second one with the same timestamp;
    ``dedup`` (default) starts it with ``-dedup.minScrapeInterval=1ms`` so that a replayed record
    leaves one sample, as in InfluxDB.
    """

    binary = "victoria-metrics"
    name = "victoria-metrics"

    def __init__(self, *, dedup: bool = True, extra_args: list[str] | None = None) -> None:
        super().__init__()
        self.dedup = dedup
        self.extra_args = list(extra_args or [])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _configure(self) -> list[str]:
        return [f"-httpListenAddr={HOST}:{self.port}", f"-storageDataPath={self.workdir}/data",
                "-retentionPeriod=100y", "-search.latencyOffset=0s", "-search.disableCache",
                "-loggerLevel=INFO", *(["-dedup.minScrapeInterval=1ms"] if self.dedup else []), *self.extra_args]

    def _ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/health", timeout=1.0)
        return status == 200

    def force_flush(self) -> None:
        """Make everything ingested so far searchable."""
        status, body = _http("GET", f"{self.url}/internal/force_flush")
        if status != 200:
            raise ServiceError(f"force_flush: HTTP {status}: {body[:300]!r}")

    def export(self, match: str = '{__name__=~".+"}') -> list[dict]:
        """Series from /api/v1/export (JSON lines): dicts with ``metric`` (labels), ``values``, ``timestamps`` (ms).

        All time, including the future (a scaled simulation clock runs ahead of the wall clock;
        /api/v1/export would otherwise stop at now).
        """
        params = {"match[]": match, "start": "0", "end": str(int(time.time()) + 10 * 365 * 86400)}
        url = f"{self.url}/api/v1/export?{urllib.parse.urlencode(params)}"
        status, body = _http("GET", url)
        if status != 200:
            raise ServiceError(f"export {match}: HTTP {status}: {body[:300]!r}")
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]
