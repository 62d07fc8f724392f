"""The ``influx`` section of the configuration (the bridge's store) and what a bridge
process needs: that section, the ``mqtt`` section and where it keeps its dead letters."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from energy_agent.core.errors import ConfigError
from energy_agent.core.secrets import read_secret
from energy_agent.core.validation import ENV_NAME, Float, Model, Name, check_url
from energy_agent.delivery.config import MqttConfig


class InfluxConfig(Model):
    api: Literal["v1", "v2"] = Field("v1", description="v1: POST /write (InfluxDB 1.x); v2: /api/v2/write")
    url: str = Field(pattern=r"^https?://", description="http(s)://host[:port][/path] of the store")
    database: Name | None = Field(None, description="v1: database")
    retention_policy: Name | None = None
    org: Name | None = Field(None, description="v2: organisation")
    bucket: Name | None = Field(None, description="v2: bucket")
    token_env: str | None = Field(None, pattern=ENV_NAME,
                                  description="v2: name of the environment variable holding the token")
    measurement: Name = Field("job_energy", description="measurement of job records")
    interval_measurement: Name = Field("machine_energy", description=(
        "measurement of interval records (a machine's energy between jobs and while jobs could not be observed)"))
    timeout_s: Float = Field(10.0, ge=0.001, le=3600)
    subscription: str = Field(
        "energy/v1/+/+/+/record", description="MQTT topic filter the bridge subscribes to"
    )
    client_id: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^\x00-\x20#+/]+$",
                                  description="bridge MQTT client id (default: energy-bridge-<site>-<hash of the target store>)")
    confirm_as: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description=(
        "after the store accepted a record, publish its id to <prefix>/<site>/<agent>/confirm under "
        "this name (agents list it in mqtt.confirm_by); bridges of one shared subscription use one name"))

    @model_validator(mode="after")
    def _target(self) -> InfluxConfig:
        if self.api == "v1" and not self.database:
            raise ValueError("api v1 needs database")
        if self.api == "v2" and not (self.org and self.bucket):
            raise ValueError("api v2 needs org and bucket")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v, ("http", "https"))

    @field_validator("subscription")
    @classmethod
    def _filter(cls, v: str) -> str:
        return check_topic_filter(v)

    def file_problems(self) -> list[str]:
        """The token, read at start: a variable named but not set is an error, not an empty token."""
        try:
            read_secret("influx", self.token_env, None, Path("."), field="token")
        except ConfigError as exc:
            return [str(exc)]
        return []


def check_topic_filter(v: str) -> str:
    """``v`` if it is an MQTT topic filter (MQTT 5.0, 4.7; with ``$share/<group>/``), else
    ValueError saying why."""
    topic = v
    if v.startswith("$share/"):
        parts = v.split("/", 2)
        if len(parts) < 3 or not parts[1] or any(c in parts[1] for c in "#+") or not parts[2]:
            raise ValueError(f"{v!r}: a shared subscription is $share/<group>/<filter>")
        topic = parts[2]
    if not topic or "\0" in topic or len(v.encode()) > 65535:
        raise ValueError(f"{v!r} is not an MQTT topic filter")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{v!r}: '#' must be a whole level, the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{v!r}: '+' must be a whole level")
    return v


DEAD_LETTER_NAME = "bridge-dead-letter.jsonl"


@dataclass(frozen=True)
class BridgeSettings:
    """Everything a bridge process needs, and nothing of the agent's devices or records."""

    site: str
    mqtt: MqttConfig
    influx: InfluxConfig
    base: Path
    """The config file's folder: relative TLS and password file paths are taken from it."""
    state_dir: Path
    """Where the bridge keeps its dead-letter file unless told otherwise."""

    def dead_letter_path(self) -> Path:
        """``$STATE_DIRECTORY`` (systemd's StateDirectory=) if set, else ``state_dir``."""
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return (Path(state) if state else self.state_dir) / DEAD_LETTER_NAME

    def client_id(self) -> str:
        """influx.client_id, else one per site and target store: two bridges writing to different
        stores must not share a session (the broker would keep disconnecting one of them)."""
        ic = self.influx
        if ic.client_id:
            return ic.client_id
        target = f"{ic.url}|{ic.database or ''}|{ic.org or ''}|{ic.bucket or ''}"
        return f"energy-bridge-{self.site}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"
