"""The ``mqtt`` section of the configuration: broker, credentials, TLS, topics, delivery.

Credentials go over TLS: a ``username`` without a ``tls`` section is refused unless
``allow_plaintext_credentials: true`` says it out loud (a broker on the same host), and then a
warning is logged at start. :meth:`MqttConfig.file_problems` reads the TLS files and the
password at start, so ``check-config`` finds them missing, not the first connect.
"""

from __future__ import annotations

import ssl
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import Field, StringConstraints, field_validator, model_validator

from energy_agent.core.errors import ConfigError
from energy_agent.core.secrets import read_secret
from energy_agent.core.validation import ENV_NAME, Bool, FilePath, Float, Host, Int, Model

BridgeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
"""A bridge's confirmation name (``influx.confirm_as``), one topic level."""


class MqttTls(Model):
    """TLS to the broker. With a tls section the agent never connects in plaintext."""

    ca_file: FilePath | None = Field(None, description="CA certificate(s) to verify the broker, PEM (default: system CAs)")
    cert_file: FilePath | None = Field(None, description="client certificate (PEM), for brokers that require one")
    key_file: FilePath | None = Field(None, description="the client certificate's private key (PEM, unencrypted)")

    @model_validator(mode="after")
    def _pair(self) -> MqttTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    def file_problems(self, base: Path) -> list[str]:
        """Each TLS file that is missing, unreadable or not what its field says; a client key
        that is encrypted or does not match its certificate."""
        problems: list[str] = []

        def path(p: Path) -> Path:
            return p if p.is_absolute() else base / p

        if self.ca_file is not None:
            ca = path(self.ca_file)
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(ca))
            except ssl.SSLError as exc:
                problems.append(f"mqtt.tls.ca_file: {ca} holds no PEM certificate ({exc.reason or exc})")
            except OSError as exc:
                problems.append(f"mqtt.tls.ca_file: cannot read {ca}: {exc.strerror}")
        if self.cert_file is None or self.key_file is None:
            return problems
        cert, key = path(self.cert_file), path(self.key_file)
        from cryptography import x509  # only for client certificates
        from cryptography.hazmat.primitives import serialization

        ok = True
        try:
            chain = x509.load_pem_x509_certificates(cert.read_bytes())
            now = datetime.now(timezone.utc)
            if now > chain[0].not_valid_after_utc:
                problems.append(f"mqtt.tls.cert_file: {cert} expired on {chain[0].not_valid_after_utc:%Y-%m-%d}")
        except OSError as exc:
            problems.append(f"mqtt.tls.cert_file: cannot read {cert}: {exc.strerror}")
            ok = False
        except ValueError:
            problems.append(f"mqtt.tls.cert_file: {cert} is not a PEM certificate")
            ok = False
        try:
            serialization.load_pem_private_key(key.read_bytes(), password=None)
        except OSError as exc:
            problems.append(f"mqtt.tls.key_file: cannot read {key}: {exc.strerror}")
            ok = False
        except TypeError:
            problems.append(f"mqtt.tls.key_file: {key} is encrypted, and the agent has no passphrase for it")
            ok = False
        except ValueError:
            problems.append(f"mqtt.tls.key_file: {key} is not a PEM private key")
            ok = False
        if ok:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(key))
            except (ssl.SSLError, OSError) as exc:
                problems.append(f"mqtt.tls.key_file: {key} is not the key of cert_file {cert} "
                                f"({getattr(exc, 'reason', None) or exc})")
        return problems


class MqttConfig(Model):
    host: Host = "127.0.0.1"
    port: Int = Field(1883, ge=1, le=65535)
    username: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    password_env: str | None = Field(None, pattern=ENV_NAME,
                                     description="name of the environment variable holding the password")
    password_file: FilePath | None = Field(None, description="file holding the password (first line)")
    tls: MqttTls | None = None
    allow_plaintext_credentials: Bool = Field(False, description=(
        "send username and password without TLS (a broker on this host only); logged as a warning at start"))
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x20#+/]+$")] | None = (
        Field(None, description="default: energy-agent-<site>-<agent_id>"))
    topic_prefix: str = Field("energy/v1", description="records go to <prefix>/<site>/<agent>/<machine>/record")
    keepalive_s: Int = Field(30, ge=5, le=3600)
    publish_timeout_s: Float = Field(10.0, gt=0, le=3600)
    max_inflight: Int = Field(1000, ge=1, le=65535, description=(
        "QoS 1 messages on the wire at once: the outbox drain after an outage is bounded by it"))
    confirm_by: list[BridgeName] = Field(default_factory=list, description=(
        "bridges (their influx.confirm_as names) that must confirm each record after their store "
        "accepted it; unconfirmed records are published again after resend_after_s. Empty: a "
        "record is done when the broker acknowledged it"))
    resend_after_s: Float = Field(300.0, gt=0, le=30 * 86400,
                                  description="publish an unconfirmed record again after this many seconds")
    status: Bool = Field(True, description=(
        "retained <prefix>/<site>/<agent>/status (online/offline, also as last will) and "
        "<prefix>/<site>/<agent>/device/<id>/availability topics"))

    @model_validator(mode="after")
    def _secret(self) -> MqttConfig:
        if self.password_env and self.password_file:
            raise ValueError("password_env and password_file: give one")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        if self.username and self.tls is None and not self.allow_plaintext_credentials:
            raise ValueError("username: credentials without a tls section would cross the network in plaintext; "
                             "add tls (ca_file: the broker's CA), or set allow_plaintext_credentials: true "
                             "for a broker on this host")
        return self

    def password(self, base: Path) -> str | None:
        """The password from the environment or its file; ConfigError names what is missing.
        Secrets never live in the YAML and are never part of the config hash or logs."""
        return read_secret("mqtt", self.password_env, self.password_file, base)

    def file_problems(self, base: Path) -> list[str]:
        """What stops the first connect, found at start: the TLS files and the password."""
        problems = [] if self.tls is None else self.tls.file_problems(base)
        try:
            self.password(base)
        except ConfigError as exc:
            problems.append(str(exc))
        return problems

    def warnings(self) -> list[str]:
        """What the operator allowed and should hear about at every start."""
        if self.username and self.tls is None:
            return [f"mqtt: user {self.username!r} and its password go to {self.host}:{self.port} in plaintext "
                    "(allow_plaintext_credentials: true); add a tls section unless the broker is on this host"]
        return []

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if (any(c in v for c in "#+\0") or v.startswith("/") or v.endswith("/") or not v or "//" in v
                or len(v) > 1024):
            raise ValueError("topic_prefix must be a plain topic without wildcards, empty levels or "
                             "leading/trailing '/'")
        return v
