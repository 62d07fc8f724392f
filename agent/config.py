"""The agent's configuration: one YAML file, validated once at start.

Every error names the field and the device or machine, e.g.
``machines[1].meter: unknown meter 'pm-7' (known: pm-1, pm-2)``. Nothing fails at poll
time because of configuration. ``energy-agent schema`` prints the JSON Schema of this model.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from drivers.profile import MeterProfile, NodeMap, NodeRef, format_validation, load_nodemap, load_profile

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmissionFactor(_Model):
    """A declared grid emission factor, with everything a verifier asks about it."""

    value: float = Field(gt=0, description="kg CO2e per kWh")
    unit: Literal["kgCO2e/kWh"] = "kgCO2e/kWh"
    authority: str = Field(description="who publishes it, e.g. 'Vietnam MONRE, Department of Climate Change'")
    document: str = Field(description="the publication, e.g. a letter or notice number")
    region: str = Field(description="grid region, e.g. 'VN' or 'CN'")
    year: int = Field(ge=1990, le=2100, description="data year of the factor")
    method: str = Field("", description="e.g. 'CDM grid tool, combined margin'")
    basis: Literal["location", "market"] = Field(description="GHG Protocol Scope 2 basis")
    valid_from: date | None = None
    valid_to: date | None = None

    @model_validator(mode="after")
    def _dates(self) -> "EmissionFactor":
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise ValueError("valid_to is before valid_from")
        return self


class Calibration(_Model):
    certificate: str | None = None
    valid_until: date | None = None


class SerialLine(_Model):
    """An RS-485 line on a local serial port (transport ``rtu``)."""

    device: str = Field(description="serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/…")
    baudrate: int = Field(9600, ge=1200, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class MeterDevice(_Model):
    id: str = Field(pattern=_ID)
    transport: Literal["tcp", "rtu-over-tcp", "rtu"] = Field(
        "tcp", description="tcp: Modbus TCP; rtu-over-tcp: RTU frames through a TCP gateway; rtu: local serial line")
    host: str | None = Field(None, description="meter or gateway address (tcp, rtu-over-tcp)")
    port: int = Field(502, ge=1, le=65535)
    serial: SerialLine | None = Field(None, description="the serial line (rtu)")
    pause_s: float = Field(0.0, ge=0, le=5, description="quiet time on the bus after each request to this meter")
    unit_id: int = Field(1, ge=0, le=247)
    profile: str = Field(description="built-in profile name or path to a profile .yaml")
    poll_interval_s: float = Field(1.0, gt=0, le=3600)
    timeout_s: float = Field(1.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=10)
    accuracy: str | None = Field(None, description="accuracy class, e.g. 'IEC 62053-21 class 1'")
    calibration: Calibration | None = None
    boundary: str | None = Field(None, description="which loads the meter covers")

    @model_validator(mode="after")
    def _link(self) -> "MeterDevice":
        if self.transport == "rtu" and self.serial is None:
            raise ValueError("transport rtu needs serial (device, baudrate, ...)")
        if self.transport != "rtu" and not self.host:
            raise ValueError(f"transport {self.transport} needs host")
        return self

    def bus_key(self) -> tuple:
        """Meters with the same key share one connection (and its lock)."""
        if self.transport == "rtu":
            assert self.serial is not None
            return ("rtu", self.serial.device)
        return (self.transport, self.host, self.port)


def _read_secret(where: str, env: str | None, file: Path | None, base: Path) -> str | None:
    """A secret from an environment variable or the first line of a file; ConfigError names
    ``where`` and what is missing, never the secret."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}.password_env: environment variable {env} is not set")
        return value
    if file:
        path = file if file.is_absolute() else base / file
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{where}.password_file: cannot read {path}: {exc.strerror}") from None
        return text.splitlines()[0] if text else ""
    return None


class CncSecurity(_Model):
    """OPC UA security of one CNC connection (OPC 10000-2/-4: SecurityPolicy, MessageSecurityMode,
    user identity). Relative paths are taken from the config file's folder; the password lives in
    an environment variable or a file, never in the YAML, and is never logged."""

    policy: Literal["None", "Basic256Sha256"] = Field("None", description="security policy of the secure channel")
    mode: Literal["None", "Sign", "SignAndEncrypt"] = Field("None", description="message security mode")
    certificate: Path | None = Field(None, description="client certificate (.der or .pem); `energy-agent certs` makes one")
    private_key: Path | None = Field(None, description="the client certificate's private key (.pem or .der)")
    server_certificate: Path | None = Field(None, description="the server certificate to trust (pinned)")
    trust_dir: Path | None = Field(None, description="folder of trusted server certificates (or their CAs), .der/.pem")
    username: str | None = Field(None, description="user name identity; without it the session is anonymous")
    password_env: str | None = Field(None, description="name of the environment variable holding the password")
    password_file: Path | None = Field(None, description="file holding the password (first line)")

    @model_validator(mode="after")
    def _consistent(self) -> "CncSecurity":
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError(f"mode: policy {self.policy} with mode {self.mode} (policy None goes with mode None, "
                             "Basic256Sha256 with Sign or SignAndEncrypt)")
        if self.mode != "None":
            if self.certificate is None:
                raise ValueError(f"certificate: mode {self.mode} needs a client certificate (and private_key)")
            if self.private_key is None:
                raise ValueError(f"private_key: mode {self.mode} needs the client certificate's private key")
            if self.server_certificate is None and self.trust_dir is None:
                raise ValueError(f"server_certificate: mode {self.mode} needs server_certificate or trust_dir "
                                 "to decide whether to trust the server")
        elif self.server_certificate or self.trust_dir:
            raise ValueError("server_certificate: a trusted server certificate needs mode Sign or SignAndEncrypt")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("private_key: certificate and private_key go together")
        if self.password_env and self.password_file:
            raise ValueError("password_env: password_env and password_file: give one")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("username: a password needs a username")
        if self.username and not (self.password_env or self.password_file):
            raise ValueError("username: needs password_env or password_file")
        return self

    def resolved(self, base: Path) -> "CncSecurity":
        """A copy with every path made absolute against ``base`` (the config file's folder)."""
        fields = ("certificate", "private_key", "server_certificate", "trust_dir", "password_file")
        changes = {f: base / p for f in fields if (p := getattr(self, f)) is not None and not p.is_absolute()}
        return self.model_copy(update=changes)

    def password(self, where: str = "security", base: Path = Path(".")) -> str | None:
        return _read_secret(where, self.password_env, self.password_file, base)


class CncDevice(_Model):
    id: str = Field(pattern=_ID)
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="opc.tcp://host:port[/path]")
    node_map: str = Field("opc40502", description="built-in node map name or path to a .yaml")
    params: dict[str, str] = Field(default_factory=dict, description="values for the node map's {placeholders}")
    mode: Literal["subscribe", "poll"] = "subscribe"
    interval_s: float = Field(0.5, gt=0, le=60, description="subscription publishing / poll interval")
    timeout_s: float = Field(4.0, gt=0, le=60)
    timestamps: Literal["source", "received"] = Field(
        "source", description="place changes at the server's SourceTimestamp (clamped to when they were seen) or at receipt"
    )
    security: CncSecurity = Field(default_factory=CncSecurity, description="OPC UA security (default: policy None)")
    watchdog_intervals: float = Field(
        10.0, ge=3, le=1000, description=("publishing intervals without data or keep-alive after which a "
                                          "subscription counts as lost and the driver reconnects"))
    settle_s: float | None = Field(
        None, ge=0, le=60, description=(
            "how long an instant's changes (one SourceTimestamp) are held for more of them before the "
            "machine sees the instant. Default: on a subscription, until the end of a publish response "
            "the server built more than 0.05 s after it received the instant's first value (by "
            "PublishTime and ServerTimestamp), else 1.5 x interval_s of quiet (a server's updates of "
            "one instant split over two publish responses still merge); a number: that quiet period; "
            "0: hand over at the end of each publish response or poll (for servers that update an "
            "instant's nodes at once)"))


class ProgramInfo(_Model):
    product: str | None = None
    subassembly: str | None = None


class Machine(_Model):
    id: str = Field(pattern=_ID)
    meter: str
    cnc: str = Field(description="the CNC whose signals define this machine's jobs and states")
    emission_factor: str
    description: str = ""
    programs: dict[str, ProgramInfo] = Field(
        default_factory=dict, description="product/subassembly per program, where the CNC does not send them"
    )
    standby_below_w: float | None = Field(None, ge=0, description="'ready' below this power counts as standby")
    off_below_w: float | None = Field(None, ge=0, description="below this power the machine counts as off")
    max_gap_s: float | None = Field(
        None, gt=0, description="meter silence longer than this is a gap (default: 5 poll intervals)"
    )
    close_timeout_s: float | None = Field(
        None, gt=0, description="how long a finished job waits for the next meter sample (default: 10 poll intervals)"
    )


class ClockConfig(_Model):
    speed: float = Field(1.0, gt=0, le=1000, description="simulated plants only: time runs this many times faster")
    anchor: datetime | None = Field(None, description="wall instant from which a scaled clock runs fast")

    @model_validator(mode="after")
    def _anchor(self) -> "ClockConfig":
        if self.speed != 1.0 and self.anchor is None:
            raise ValueError("a clock speed other than 1 needs an anchor")
        return self

    def anchor_s(self) -> float:
        if self.anchor is None:
            return 0.0
        a = self.anchor if self.anchor.tzinfo else self.anchor.replace(tzinfo=timezone.utc)
        return a.timestamp()


class LedgerConfig(_Model):
    path: Path = Path("var/ledger.db")
    checkpoint_s: float = Field(5.0, gt=0, le=3600, description=(
        "real seconds between checkpoints of open jobs (job, states, samples): after a crash or a "
        "restart the agent resumes them and loses at most this much of their samples"))
    retention_days: float | None = Field(None, gt=0, description=(
        "prune delivered records older than this many days (none: keep everything); chain heads "
        "stay verifiable through per-machine anchors"))
    hold_max: int = Field(10000, ge=1, description=(
        "finished jobs held in memory while the ledger refuses writes; beyond it the agent stops "
        "with an error rather than lose more"))


class ArchiveConfig(_Model):
    """The raw-sample archive: every job's kernel inputs, so ``energy-agent replay`` can
    recompute its record (docs/ARCHIVE.md)."""

    enabled: bool = Field(True, description="append each recorded job's samples to the archive")
    path: Path | None = Field(None, description=(
        "archive folder, one file per machine and UTC day (default: 'archive' beside the ledger)"))

    def folder(self, ledger_path: Path, base: Path) -> Path:
        """The archive folder: ``path`` (relative to the config's folder), else beside the ledger."""
        if self.path is None:
            ledger = ledger_path if ledger_path.is_absolute() else base / ledger_path
            return ledger.parent / "archive"
        return self.path if self.path.is_absolute() else base / self.path


class MqttTls(_Model):
    """TLS to the broker. With a tls section the agent never connects in plaintext."""

    ca_file: Path | None = Field(None, description="CA certificate(s) to verify the broker (default: system CAs)")
    cert_file: Path | None = Field(None, description="client certificate, for brokers that require one")
    key_file: Path | None = Field(None, description="the client certificate's private key")

    @model_validator(mode="after")
    def _pair(self) -> "MqttTls":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password_env: str | None = Field(None, description="name of the environment variable holding the password")
    password_file: Path | None = Field(None, description="file holding the password (first line)")
    tls: MqttTls | None = None
    client_id: str | None = Field(None, description="default: energy-agent-<site>-<agent_id>")
    topic_prefix: str = Field("energy/v1", description="records go to <prefix>/<site>/<agent>/<machine>/record")
    keepalive_s: int = Field(30, ge=5, le=3600)
    publish_timeout_s: float = Field(10.0, gt=0)
    max_inflight: int = Field(1000, ge=1, le=65535, description=(
        "QoS 1 messages on the wire at once: the outbox drain after an outage is bounded by it"))
    confirm_by: list[str] = Field(default_factory=list, description=(
        "bridges (their influx.confirm_as names) that must confirm each record after their store "
        "accepted it; unconfirmed records are published again after resend_after_s. Empty: a "
        "record is done when the broker acknowledged it"))
    resend_after_s: float = Field(300.0, gt=0, description="publish an unconfirmed record again after this many seconds")
    status: bool = Field(True, description=(
        "retained <prefix>/<site>/<agent>/status (online/offline, also as last will) and "
        "<prefix>/<site>/<agent>/device/<id>/availability topics"))

    @model_validator(mode="after")
    def _secret(self) -> "MqttConfig":
        if self.password_env and self.password_file:
            raise ValueError("password_env and password_file: give one")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def password(self, base: Path) -> str | None:
        """The password from the environment or its file; ConfigError names what is missing.
        Secrets never live in the YAML and are never part of the config hash or logs."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return value
        if self.password_file:
            path = self.password_file if self.password_file.is_absolute() else base / self.password_file
            try:
                return path.read_text().splitlines()[0] if path.read_text() else ""
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {path}: {exc.strerror}") from None
        return None

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if any(c in v for c in "#+") or v.startswith("/") or v.endswith("/") or not v:
            raise ValueError("topic_prefix must be a plain topic without wildcards or leading/trailing '/'")
        return v


class InfluxConfig(_Model):
    api: Literal["v1", "v2"] = Field("v1", description="v1: POST /write (InfluxDB 1.x); v2: /api/v2/write")
    url: str = Field(pattern=r"^https?://")
    database: str | None = Field(None, description="v1: database")
    retention_policy: str | None = None
    org: str | None = Field(None, description="v2: organisation")
    bucket: str | None = Field(None, description="v2: bucket")
    token_env: str | None = Field(None, description="v2: name of the environment variable holding the token")
    measurement: str = "job_energy"
    timeout_s: float = Field(10.0, gt=0)
    subscription: str = Field(
        "energy/v1/+/+/+/record", description="MQTT topic filter the bridge subscribes to"
    )
    client_id: str | None = Field(None, description="bridge MQTT client id (default: energy-bridge-<site>-<hash of the target store>)")
    confirm_as: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description=(
        "after the store accepted a record, publish its id to <prefix>/<site>/<agent>/confirm under "
        "this name (agents list it in mqtt.confirm_by); bridges of one shared subscription use one name"))

    @model_validator(mode="after")
    def _target(self) -> "InfluxConfig":
        if self.api == "v1" and not self.database:
            raise ValueError("api v1 needs database")
        if self.api == "v2" and not (self.org and self.bucket):
            raise ValueError("api v2 needs org and bucket")
        return self


class Config(_Model):
    site: str = Field(pattern=_ID, description="plant or site id, part of every topic and record")
    agent_id: str = Field(pattern=_ID, description="this gateway's id")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    clock: ClockConfig = Field(default_factory=ClockConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    emission_factors: dict[str, EmissionFactor]
    meters: list[MeterDevice] = Field(default_factory=list)
    cncs: list[CncDevice] = Field(default_factory=list)
    machines: list[Machine]
    mqtt: MqttConfig | None = None
    influx: InfluxConfig | None = None

    @model_validator(mode="after")
    def _references(self) -> "Config":
        seen: dict[str, str] = {}
        for kind, items in (("meters", self.meters), ("cncs", self.cncs), ("machines", self.machines)):
            for i, item in enumerate(items):
                where = f"{kind}[{i}].id"
                key = item.id if kind != "machines" else "machine:" + item.id
                if key in seen:
                    raise ValueError(f"{where}: duplicate id {item.id!r} (also {seen[key]})")
                seen[key] = where
        meters = {m.id for m in self.meters}
        cncs = {c.id for c in self.cncs}
        used: dict[str, str] = {}
        used_cnc: dict[str, str] = {}
        for i, m in enumerate(self.machines):
            if m.meter not in meters:
                raise ValueError(f"machines[{i}].meter: unknown meter {m.meter!r} (known: {_known(meters)})")
            if m.meter in used:
                raise ValueError(f"machines[{i}].meter: meter {m.meter!r} is already assigned to machine {used[m.meter]!r}")
            used[m.meter] = m.id
            if m.cnc not in cncs:
                raise ValueError(f"machines[{i}].cnc: unknown cnc {m.cnc!r} (known: {_known(cncs)})")
            if m.cnc in used_cnc:
                raise ValueError(f"machines[{i}].cnc: cnc {m.cnc!r} is already assigned to machine {used_cnc[m.cnc]!r}")
            used_cnc[m.cnc] = m.id
            if m.emission_factor not in self.emission_factors:
                raise ValueError(
                    f"machines[{i}].emission_factor: unknown factor {m.emission_factor!r} "
                    f"(declared: {_known(self.emission_factors)})"
                )
        return self

    def meter(self, id_: str) -> MeterDevice:
        return next(m for m in self.meters if m.id == id_)

    def cnc(self, id_: str) -> CncDevice:
        return next(c for c in self.cncs if c.id == id_)

    def config_hash(self) -> str:
        """SHA-256 of the validated configuration (comments and key order do not count)."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


def _known(ids) -> str:
    return ", ".join(sorted(ids)) or "none"


class Loaded:
    """A validated configuration with its profiles and node maps loaded."""

    def __init__(self, config: Config, base: Path):
        self.config = config
        self.base = base
        self.profiles: dict[str, MeterProfile] = {}
        self.nodemaps: dict[str, NodeMap] = {}
        self.node_ids: dict[str, dict[str, NodeRef]] = {}
        self.security: dict[str, CncSecurity] = {c.id: c.security.resolved(base) for c in config.cncs}
        """Per CNC, its security with paths made absolute (files are read at connect)."""
        for i, m in enumerate(config.meters):
            try:
                self.profiles[m.id] = load_profile(m.profile, base)
            except ConfigError as exc:
                raise ConfigError(f"meters[{i}].profile ({m.id}): {exc}") from None
        for i, c in enumerate(config.cncs):
            try:
                nm = load_nodemap(c.node_map, base)
                self.nodemaps[c.id] = nm
                self.node_ids[c.id] = nm.resolve(c.params)
            except ConfigError as exc:
                raise ConfigError(f"cncs[{i}].node_map ({c.id}): {exc}") from None
            except ValueError as exc:
                raise ConfigError(f"cncs[{i}].params ({c.id}): {exc}") from None


def parse(data: object, base: Path = Path(".")) -> Loaded:
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc)) from None
    return Loaded(cfg, base)


def load(path: str | Path) -> Loaded:
    """Read, validate and resolve a config file; raise ConfigError naming what is wrong."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse(data, p.parent)


def json_schema() -> dict:
    return Config.model_json_schema()


