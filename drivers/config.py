"""The device sections of the configuration (``meters[]``, ``cncs[]``): what a driver needs
to reach a device, validated at start."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from energy_agent.core.record import Calibration as RecordCalibration
from energy_agent.core.record import CncRef, MeterRef
from energy_agent.core.secrets import read_secret
from energy_agent.core.validation import ID_PATTERN, Model


class Calibration(Model):
    certificate: str | None = None
    valid_until: date | None = None


class SerialLine(Model):
    """An RS-485 line on a local serial port (transport ``rtu``)."""

    device: str = Field(description="serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/…")
    baudrate: int = Field(9600, ge=1200, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class MeterDevice(Model):
    id: str = Field(pattern=ID_PATTERN)
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

    def as_ref(self, profile: str) -> MeterRef:
        """This meter as records name it; ``profile`` is the name of the profile that decoded it."""
        cal = self.calibration
        return MeterRef(id=self.id, profile=profile, accuracy=self.accuracy, boundary=self.boundary,
                        calibration=None if cal is None else RecordCalibration(
                            certificate=cal.certificate,
                            valid_until=cal.valid_until.isoformat() if cal.valid_until else None))

    def bus_key(self) -> tuple:
        """Meters with the same key share one connection (and its lock)."""
        if self.transport == "rtu":
            assert self.serial is not None
            return ("rtu", self.serial.device)
        return (self.transport, self.host, self.port)


class CncSecurity(Model):
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
        return read_secret(where, self.password_env, self.password_file, base)


class CncDevice(Model):
    id: str = Field(pattern=ID_PATTERN)
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

    def as_ref(self) -> CncRef:
        """This CNC as records name it."""
        return CncRef(id=self.id, node_map=self.node_map)
