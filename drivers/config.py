"""The device sections of the configuration (``meters[]``, ``cncs[]``): what a driver needs
to reach a device, validated at start.

Each model checks itself; :func:`check_meters` and :func:`check_cncs` check the devices
against each other (one physical meter or CNC configured twice, one RS-485 line with two
settings); :meth:`CncSecurity.file_problems` reads the certificates, keys and secrets a CNC
connection will use, so that ``check-config`` and ``run`` find them missing before any poll.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints, field_validator, model_validator

from energy_agent.core.errors import ConfigError
from energy_agent.core.record import Calibration as RecordCalibration
from energy_agent.core.record import CncRef, MeterRef
from energy_agent.core.secrets import read_secret
from energy_agent.core.validation import (
    ENV_NAME,
    ID_PATTERN,
    Date,
    FilePath,
    Float,
    Host,
    Int,
    Model,
    Name,
    Text,
    check_url,
    integer_only,
    url_key,
)

OPCUA_PORT = 4840
"""The port of an ``opc.tcp://`` endpoint that names none (OPC 10000-6, 7.2)."""


class Calibration(Model):
    certificate: Text | None = None
    valid_until: Date | None = Field(None, description="last day of validity; records of jobs that start "
                                                       "after it carry the flag meter_calibration_expired")


class SerialLine(Model):
    """An RS-485 line on a local serial port (transport ``rtu``)."""

    device: Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\s\x00-\x1f](?:[^\x00-\x1f]*[^\s\x00-\x1f])?$")] = Field(
        description="serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/…")
    baudrate: Int = Field(9600, ge=1200, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Annotated[Literal[1, 2], BeforeValidator(integer_only)] = 1
    bytesize: Annotated[Literal[7, 8], BeforeValidator(integer_only)] = 8

    def settings(self) -> str:
        """``9600 8N1``: how the line is driven (every meter on it must agree)."""
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


class MeterDevice(Model):
    id: str = Field(pattern=ID_PATTERN)
    transport: Literal["tcp", "rtu-over-tcp", "rtu"] = Field(
        "tcp", description="tcp: Modbus TCP; rtu-over-tcp: RTU frames through a TCP gateway; rtu: local serial line")
    host: Host | None = Field(None, description="meter or gateway address (tcp, rtu-over-tcp)")
    port: Int = Field(502, ge=1, le=65535)
    serial: SerialLine | None = Field(None, description="the serial line (rtu)")
    pause_s: Float = Field(0.0, ge=0, le=5, description="quiet time on the bus after each request to this meter")
    unit_id: Int = Field(1, ge=0, le=247, description="Modbus unit (slave) id; 0 only over Modbus TCP")
    profile: Name = Field(description="built-in profile name or path to a profile .yaml")
    poll_interval_s: Float = Field(1.0, gt=0, le=3600)
    timeout_s: Float = Field(1.0, gt=0, le=60)
    retries: Int = Field(1, ge=0, le=10)
    accuracy: Text | None = Field(None, description="accuracy class, e.g. 'IEC 62053-21 class 1'")
    calibration: Calibration | None = None
    boundary: Text | None = Field(None, description="which loads the meter covers")

    @model_validator(mode="after")
    def _link(self) -> MeterDevice:
        if self.transport == "rtu":
            if self.serial is None:
                raise ValueError("serial: transport rtu needs serial (device, baudrate, ...)")
            if self.host is not None:
                raise ValueError("host: transport rtu reaches the meter over serial.device, not a host")
            if "port" in self.model_fields_set:
                raise ValueError("port: transport rtu has no TCP port (the line is serial.device)")
        else:
            if not self.host:
                raise ValueError(f"host: transport {self.transport} needs host")
            if self.serial is not None:
                raise ValueError(f"serial: transport {self.transport} goes over TCP to host, not a serial line "
                                 "(transport rtu for a local serial port)")
        if self.unit_id == 0 and self.transport != "tcp":
            raise ValueError("unit_id: 0 is the broadcast address on an RS-485 bus: no meter answers it (1-247)")
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
        return (self.transport, _host_key(self.host), self.port)

    def where(self) -> str:
        """``unit 3 on /dev/ttyUSB0`` or ``unit 1 at 192.0.2.10:502``, for messages."""
        if self.transport == "rtu":
            assert self.serial is not None
            return f"unit {self.unit_id} on {self.serial.device}"
        return f"unit {self.unit_id} at {self.host}:{self.port}"


def _host_key(host: str | None) -> str:
    return (host or "").rstrip(".").lower()


def check_meters(meters: list[MeterDevice]) -> None:
    """ValueError naming the meters when two entries are one meter (same unit on the same bus),
    a serial line is given two settings, or one TCP address is both a Modbus TCP device and an
    RTU-over-TCP gateway."""
    units: dict[tuple, int] = {}
    lines: dict[str, int] = {}
    sockets: dict[tuple, int] = {}
    for i, m in enumerate(meters):
        if m.transport == "rtu":
            assert m.serial is not None
            unit: tuple = ("rtu", m.serial.device, m.unit_id)
            j = lines.setdefault(m.serial.device, i)
            first = meters[j].serial
            assert first is not None
            if first != m.serial:
                raise ValueError(f"meters[{i}].serial ({m.id}): line {m.serial.device} is driven at "
                                 f"{m.serial.settings()} here but at {first.settings()} for meters[{j}] "
                                 f"({meters[j].id}): meters on one RS-485 line share its settings")
        else:
            address = (_host_key(m.host), m.port)
            unit = ("tcp", *address, m.unit_id)
            j = sockets.setdefault(address, i)
            if meters[j].transport != m.transport:
                raise ValueError(f"meters[{i}].transport ({m.id}): {m.host}:{m.port} is {m.transport} here but "
                                 f"{meters[j].transport} for meters[{j}] ({meters[j].id}): one address, one protocol")
        j = units.setdefault(unit, i)
        if j != i:
            raise ValueError(f"meters[{i}] ({m.id}): the same meter as meters[{j}] ({meters[j].id}): "
                             f"{m.where()}")


class CncSecurity(Model):
    """OPC UA security of one CNC connection (OPC 10000-2/-4: SecurityPolicy, MessageSecurityMode,
    user identity). Relative paths are taken from the config file's folder; the password lives in
    an environment variable or a file, never in the YAML, and is never logged."""

    policy: Literal["None", "Basic256Sha256"] = Field("None", description=(
        "security policy of the secure channel; None (no signature, no encryption) is logged as a "
        "warning at start"))
    mode: Literal["None", "Sign", "SignAndEncrypt"] = Field("None", description="message security mode")
    certificate: FilePath | None = Field(None, description="client certificate (.der or .pem); `energy-agent certs` makes one")
    private_key: FilePath | None = Field(None, description="the client certificate's private key (.pem or .der)")
    server_certificate: FilePath | None = Field(None, description="the server certificate to trust (pinned)")
    trust_dir: FilePath | None = Field(None, description="folder of trusted server certificates (or their CAs), .der/.pem")
    username: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        None, description="user name identity; without it the session is anonymous")
    password_env: str | None = Field(None, pattern=ENV_NAME,
                                     description="name of the environment variable holding the password")
    password_file: FilePath | None = Field(None, description="file holding the password (first line)")

    @model_validator(mode="after")
    def _consistent(self) -> CncSecurity:
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

    def resolved(self, base: Path) -> CncSecurity:
        """A copy with every path made absolute against ``base`` (the config file's folder)."""
        fields = ("certificate", "private_key", "server_certificate", "trust_dir", "password_file")
        changes = {f: base / p for f in fields if (p := getattr(self, f)) is not None and not p.is_absolute()}
        return self.model_copy(update=changes)

    def password(self, where: str = "security", base: Path = Path("."), device: str | None = None) -> str | None:
        return read_secret(where, self.password_env, self.password_file, base, device=device)

    def file_problems(self, where: str, device: str) -> list[str]:
        """What is wrong with the files and the secret this (resolved) security will use:
        missing or unreadable files, certificates or keys that do not parse, a key that does not
        match its certificate, certificates out of their validity, an unset password variable.
        Each problem names the field (``where`` is e.g. ``cncs[0].security``) and the device."""
        problems: list[str] = []
        try:
            self.password(where, device=device)
        except ConfigError as exc:
            problems.append(str(exc))
        if self.mode == "None":
            return problems
        from energy_agent.drivers import pki  # cryptography loads only for secured CNCs

        def fail(field: str, text: str) -> None:
            problems.append(f"{where}.{field} ({device}): {text}")

        cert = key = None
        assert self.certificate is not None and self.private_key is not None
        try:
            cert = pki.load_certificate(self.certificate)
        except OSError as exc:
            fail("certificate", f"cannot read {self.certificate}: {exc.strerror} (energy-agent certs makes one)")
        except ValueError:
            fail("certificate", f"{self.certificate} is not a certificate (PEM or DER)")
        if cert is not None:
            if not pki.certificate_uri(cert):
                fail("certificate", f"{self.certificate} has no application URI in its subjectAltName "
                                    "(OPC UA identifies the client by it)")
            if (why := _validity(cert)) is not None:
                fail("certificate", f"{self.certificate} {why}")
        try:
            key = _private_key(self.private_key)
        except OSError as exc:
            fail("private_key", f"cannot read {self.private_key}: {exc.strerror}")
        except ValueError as exc:
            fail("private_key", f"{self.private_key}: {exc}")
        if key is not None:
            from cryptography.hazmat.primitives.asymmetric import rsa

            if not isinstance(key, rsa.RSAPrivateKey) or not 2048 <= key.key_size <= 4096:
                fail("private_key", f"{self.private_key}: {self.policy} needs an RSA key of 2048 to 4096 bits")
            elif cert is not None and _public(cert.public_key()) != _public(key.public_key()):
                fail("private_key", f"{self.private_key} is not the key of certificate {self.certificate}")
        if self.server_certificate is not None:
            try:
                server = pki.load_certificate(self.server_certificate)
            except OSError as exc:
                fail("server_certificate", f"cannot read {self.server_certificate}: {exc.strerror}")
            except ValueError:
                fail("server_certificate", f"{self.server_certificate} is not a certificate (PEM or DER)")
            else:
                if (why := _validity(server)) is not None:
                    fail("server_certificate", f"{self.server_certificate} {why}")
        if self.trust_dir is not None:
            problems += [f"{where}.trust_dir ({device}): {p}" for p in _trust_dir_problems(self.trust_dir, pki)]
        return problems


TRUSTED_SUFFIXES = (".der", ".pem", ".crt", ".cer")
"""The files of a trust folder the driver reads (``drivers.opcua.check_server_trust``)."""


def _trust_dir_problems(folder: Path, pki: Any) -> list[str]:
    try:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in TRUSTED_SUFFIXES)
    except NotADirectoryError:
        return [f"{folder} is not a folder"]
    except OSError as exc:
        return [f"cannot read {folder}: {exc.strerror}"]
    if not files:
        return [f"{folder} holds no certificate ({', '.join(TRUSTED_SUFFIXES)}): no server would be trusted"]
    problems = []
    for f in files:
        try:
            pki.load_certificate(f)
        except OSError as exc:
            problems.append(f"cannot read {f}: {exc.strerror}")
        except ValueError:
            problems.append(f"{f} is not a certificate (PEM or DER)")
    return problems


def _private_key(path: Path) -> Any:
    """The unencrypted private key in ``path`` (PEM or DER); ValueError saying why not."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = path.read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError as exc:  # cryptography: a password is needed
        raise ValueError("the key is encrypted, and the agent has no passphrase for it "
                         "(store it unencrypted, readable by the agent's user only)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a private key (PEM or DER)") from exc


def _public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _validity(cert: Any) -> str | None:
    now = datetime.now(timezone.utc)
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    return None


class CncDevice(Model):
    id: str = Field(pattern=ID_PATTERN)
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="opc.tcp://host[:port][/path] (port default 4840)")
    node_map: Name = Field("opc40502", description="built-in node map name or path to a .yaml")
    params: dict[str, Name] = Field(default_factory=dict, description="values for the node map's {placeholders}")
    mode: Literal["subscribe", "poll"] = "subscribe"
    interval_s: Float = Field(0.5, gt=0, le=60, description="subscription publishing / poll interval")
    timeout_s: Float = Field(4.0, gt=0, le=60)
    timestamps: Literal["source", "received"] = Field(
        "source", description="place changes at the server's SourceTimestamp (clamped to when they were seen) or at receipt"
    )
    security: CncSecurity = Field(default_factory=CncSecurity, description="OPC UA security (default: policy None)")
    watchdog_intervals: Float = Field(
        10.0, ge=3, le=1000, description=("publishing intervals without data or keep-alive after which a "
                                          "subscription counts as lost and the driver reconnects"))
    settle_s: Float | None = Field(
        None, ge=0, le=60, description=(
            "how long an instant's changes (one SourceTimestamp) are held for more of them before the "
            "machine sees the instant. Default: on a subscription, until the end of a publish response "
            "the server built more than 0.05 s after it received the instant's first value (by "
            "PublishTime and ServerTimestamp), else 1.5 x interval_s of quiet (a server's updates of "
            "one instant split over two publish responses still merge); a number: that quiet period; "
            "0: hand over at the end of each publish response or poll (for servers that update an "
            "instant's nodes at once)"))

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return check_url(v, ("opc.tcp",))

    def as_ref(self) -> CncRef:
        """This CNC as records name it."""
        return CncRef(id=self.id, node_map=self.node_map)

    def signals_key(self) -> tuple:
        """What identifies the signals this entry follows: the server (case and the default port
        do not count), the node map and its params. Several CNCs may share one server (an edge
        gateway) with other params; two entries with the same key are one CNC."""
        return url_key(self.endpoint, OPCUA_PORT), self.node_map, tuple(sorted(self.params.items()))


def check_cncs(cncs: list[CncDevice]) -> None:
    """ValueError naming both entries when two CNC entries follow the same signals."""
    seen: dict[tuple, int] = {}
    for i, c in enumerate(cncs):
        j = seen.setdefault(c.signals_key(), i)
        if j != i:
            raise ValueError(f"cncs[{i}] ({c.id}): the same CNC as cncs[{j}] ({cncs[j].id}): endpoint "
                             f"{c.endpoint}, node map {c.node_map!r} and params are the same")

