"""The agent's configuration: one YAML file, validated once at start.

Every error names the field and the device or machine, e.g.
``machines[1].meter: unknown meter 'pm-7' (known: pm-1, pm-2)``. Nothing fails at poll
time because of configuration. ``energy-agent schema`` prints the JSON Schema of this model.
Each layer owns its section's model (``drivers.config``, ``records.config``,
``delivery.config``, ``bridge.config``); this module composes them.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from energy_agent.bridge.config import BridgeSettings, InfluxConfig
from energy_agent.core.errors import ConfigError
from energy_agent.core.record import CncRef, Factor, MeterRef
from energy_agent.core.validation import ID_PATTERN, Model, format_validation
from energy_agent.delivery.config import MqttConfig
from energy_agent.drivers.config import CncDevice, CncSecurity, MeterDevice
from energy_agent.drivers.nodemap import NodeMap, NodeRef, load_nodemap
from energy_agent.drivers.profile import MeterProfile, load_profile
from energy_agent.records.config import ArchiveConfig, EmissionFactor, LedgerConfig


class ProgramInfo(Model):
    product: str | None = None
    subassembly: str | None = None


class Machine(Model):
    id: str = Field(pattern=ID_PATTERN)
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


class ClockConfig(Model):
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


class Config(Model):
    site: str = Field(pattern=ID_PATTERN, description="plant or site id, part of every topic and record")
    agent_id: str = Field(pattern=ID_PATTERN, description="this gateway's id")
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


    def factor(self, factor_id: str) -> Factor:
        """A declared emission factor as records carry it."""
        return self.config.emission_factors[factor_id].as_factor(factor_id)

    def meter_ref(self, meter_id: str) -> MeterRef:
        """A meter as records name it (with the name of the profile that decoded it)."""
        return self.config.meter(meter_id).as_ref(self.profiles[meter_id].name)

    def cnc_ref(self, cnc_id: str) -> CncRef:
        return self.config.cnc(cnc_id).as_ref()

    def ledger_path(self) -> Path:
        """The ledger file, relative paths taken from the config's folder."""
        p = self.config.ledger.path
        return p if p.is_absolute() else self.base / p

    def bridge_settings(self) -> BridgeSettings:
        """What ``energy-agent bridge`` needs; ConfigError when a section is missing."""
        cfg = self.config
        missing = [name for name in ("mqtt", "influx") if getattr(cfg, name) is None]
        if missing or cfg.mqtt is None or cfg.influx is None:
            raise ConfigError(f"{' and '.join(missing)}: the bridge needs the {' and '.join(missing)} "
                              f"section{'s' if len(missing) > 1 else ''} in the config")
        return BridgeSettings(site=cfg.site, mqtt=cfg.mqtt, influx=cfg.influx, base=self.base,
                              state_dir=self.ledger_path().parent)


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
