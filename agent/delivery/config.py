"""The ``mqtt`` section of the configuration: broker, credentials, TLS, topics, delivery."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from energy_agent.core.secrets import read_secret
from energy_agent.core.validation import Model


class MqttTls(Model):
    """TLS to the broker. With a tls section the agent never connects in plaintext."""

    ca_file: Path | None = Field(None, description="CA certificate(s) to verify the broker (default: system CAs)")
    cert_file: Path | None = Field(None, description="client certificate, for brokers that require one")
    key_file: Path | None = Field(None, description="the client certificate's private key")

    @model_validator(mode="after")
    def _pair(self) -> "MqttTls":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(Model):
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
        return read_secret("mqtt", self.password_env, self.password_file, base)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if any(c in v for c in "#+") or v.startswith("/") or v.endswith("/") or not v:
            raise ValueError("topic_prefix must be a plain topic without wildcards or leading/trailing '/'")
        return v
