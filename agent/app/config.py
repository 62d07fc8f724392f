"""The agent's configuration: one YAML file, validated once at start.

Every error names the field and the device or machine, e.g.
``machines[1].meter: unknown meter 'pm-7' (known: pm-1, pm-2)``. Nothing fails at poll time
because of configuration. ``energy-agent schema`` prints the JSON Schema of this model.
Each layer owns its section's model (``drivers.config``, ``records.config``,
``delivery.config``, ``bridge.config``); this module composes them.

Two steps: :func:`load` reads the file strictly (``core.yamlfile``), validates the model and
loads the profiles and node maps it names; :meth:`Loaded.check_start` then reads what a
command will use (certificates, keys, secrets, the ledger's place) and returns the warnings to
say at start. ``check-config``, ``run`` and ``bridge`` take both steps; ``certs`` takes only the
first (it makes the certificate the second would look for).
"""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, ValidationError, model_validator

from energy_agent.bridge.config import BridgeSettings, InfluxConfig
from energy_agent.core.errors import ConfigError
from energy_agent.core.record import CncRef, Factor, MeterRef
from energy_agent.core.validation import ID_PATTERN, Float, Model, Text, format_validation
from energy_agent.core.yamlfile import load_yaml
from energy_agent.delivery.config import MqttConfig
from energy_agent.drivers.config import CncDevice, CncSecurity, MeterDevice, check_cncs, check_meters
from energy_agent.drivers.nodemap import NodeMap, NodeRef, load_nodemap
from energy_agent.drivers.profile import MeterProfile, load_profile
from energy_agent.records.config import ArchiveConfig, EmissionFactor, LedgerConfig, path_problems

Command = Literal["run", "bridge", "check-config"]
"""The commands that check a config at start (:meth:`Loaded.check_start`)."""

FactorId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class ProgramInfo(Model):
    product: Text | None = None
    subassembly: Text | None = None


class Machine(Model):
    id: str = Field(pattern=ID_PATTERN)
    meter: str
    cnc: str = Field(description="the CNC whose signals define this machine's jobs and states")
    emission_factor: str
    description: Text = ""
    programs: dict[Text, ProgramInfo] = Field(
        default_factory=dict, description="product/subassembly per program, where the CNC does not send them"
    )
    standby_below_w: Float | None = Field(None, ge=0, le=1e7, description="'ready' below this power counts as standby")
    off_below_w: Float | None = Field(None, ge=0, le=1e7, description=(
        "below this power the machine counts as off (at most standby_below_w)"))
    max_gap_s: Float | None = Field(
        None, gt=0, le=86400, description="meter silence longer than this is a gap (default: 5 poll intervals)"
    )
    close_timeout_s: Float | None = Field(
        None, gt=0, le=86400,
        description="how long a finished job waits for the next meter sample (default: 10 poll intervals)"
    )
    interval_s: Float = Field(3600.0, ge=60, le=86400, description=(
        "idle and unobserved time between jobs is recorded in intervals cut at multiples of this (wall time); "
        "the samples of one interval are kept in memory until it is recorded"))
    outage_close_s: Float = Field(900.0, gt=0, le=7 * 86400, description=(
        "an outage of the CNC longer than this ends the open job where it was last seen (end estimated) "
        "without waiting for the CNC to come back (docs/EVIDENCE.md, Outages)"))

    @model_validator(mode="after")
    def _thresholds(self) -> Machine:
        off, standby = self.off_below_w, self.standby_below_w
        if off is not None and standby is not None and off > standby:
            raise ValueError(f"off_below_w: {off:g} W is above standby_below_w {standby:g} W "
                             "(off is the lower band: off < standby < ready)")
        return self


class ClockConfig(Model):
    speed: Float = Field(1.0, gt=0, le=1000, description="simulated plants only: time runs this many times faster")
    anchor: datetime | None = Field(None, description="wall instant from which a scaled clock runs fast")

    @model_validator(mode="after")
    def _anchor(self) -> ClockConfig:
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
    emission_factors: dict[FactorId, EmissionFactor] = Field(default_factory=dict)
    meters: list[MeterDevice] = Field(default_factory=list)
    cncs: list[CncDevice] = Field(default_factory=list)
    machines: list[Machine] = Field(default_factory=list, description=(
        "`run` needs at least one; a config for `bridge` only may have none"))
    mqtt: MqttConfig | None = None
    influx: InfluxConfig | None = None

    @model_validator(mode="after")
    def _references(self) -> Config:
        seen: dict[str, str] = {}
        for kind, items in (("meters", self.meters), ("cncs", self.cncs), ("machines", self.machines)):
            for i, item in enumerate(items):
                where = f"{kind}[{i}].id"
                key = item.id if kind != "machines" else "machine:" + item.id
                if key in seen:
                    raise ValueError(f"{where}: duplicate id {item.id!r} (also {seen[key]})")
                seen[key] = where
        check_meters(self.meters)
        check_cncs(self.cncs)
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
        """Per CNC, its security with paths made absolute (files are read by :meth:`check_start`
        and at connect)."""
        for i, m in enumerate(config.meters):
            try:
                self.profiles[m.id] = load_profile(m.profile, base)
            except ConfigError as exc:
                raise ConfigError(f"meters[{i}].profile ({m.id}): {exc}") from exc
            except (OSError, ValueError) as exc:  # a file the data-file reader could not read
                raise ConfigError(f"meters[{i}].profile ({m.id}): cannot read {m.profile}: {exc}") from exc
        for i, c in enumerate(config.cncs):
            try:
                nm = load_nodemap(c.node_map, base)
            except ConfigError as exc:
                raise ConfigError(f"cncs[{i}].node_map ({c.id}): {exc}") from exc
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cncs[{i}].node_map ({c.id}): cannot read {c.node_map}: {exc}") from exc
            try:
                self.node_ids[c.id] = nm.resolve(c.params)
            except ValueError as exc:
                raise ConfigError(f"cncs[{i}].params ({c.id}): {exc}") from exc
            self.nodemaps[c.id] = nm

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
        return self.config.ledger.file(self.base)

    def bridge_settings(self) -> BridgeSettings:
        """What ``energy-agent bridge`` needs; ConfigError when a section is missing."""
        cfg = self.config
        missing = [name for name in ("mqtt", "influx") if getattr(cfg, name) is None]
        if missing or cfg.mqtt is None or cfg.influx is None:
            raise ConfigError(f"{' and '.join(missing)}: the bridge needs the {' and '.join(missing)} "
                              f"section{'s' if len(missing) > 1 else ''} in the config")
        return BridgeSettings(site=cfg.site, mqtt=cfg.mqtt, influx=cfg.influx, base=self.base,
                              state_dir=self.ledger_path().parent)

    # ------------------------------------------------------------------ start checks

    def uses(self) -> list[str]:
        """What this config is good for: ``run`` (it has machines), ``bridge`` (mqtt and influx)."""
        cfg = self.config
        return [name for name, ok in (("run", bool(cfg.machines)), ("bridge", cfg.mqtt is not None
                                                                     and cfg.influx is not None)) if ok]

    def check_start(self, command: Command, today: date | None = None) -> list[str]:
        """Check what ``command`` will use before it starts: that it has what it needs (``run``
        a machine, ``bridge`` the mqtt and influx sections), the certificates, keys and secrets
        of the sections it uses (read now, not at the first connect), the ledger's place.
        ``check-config`` checks every section the file has. Raises ConfigError naming every
        problem; returns the warnings to say at start (plaintext credentials allowed, OPC UA
        without security, calibrations and factors out of validity on ``today``)."""
        cfg = self.config
        uses = self.uses()
        problems: list[str] = []
        if command == "run" and "run" not in uses:
            problems.append("machines: `run` needs at least one machine" + (
                " (this config is for `bridge` only)" if uses else ""))
        if command == "bridge" and "bridge" not in uses:
            missing = " and ".join(n for n in ("mqtt", "influx") if getattr(cfg, n) is None)
            problems.append(f"{missing}: `bridge` needs the mqtt and influx sections")
        if command == "check-config" and not uses:
            problems.append("machines: none, so nothing for `run`; and no mqtt and influx sections for "
                            "`bridge`: this config is good for nothing")
        runs = command == "run" or (command == "check-config" and "run" in uses)
        if runs:
            problems += path_problems(cfg.ledger, cfg.archive, self.base)
        if command != "bridge":
            for i, c in enumerate(cfg.cncs):
                problems += self.security[c.id].file_problems(f"cncs[{i}].security", c.id)
        if cfg.mqtt is not None:
            problems += cfg.mqtt.file_problems(self.base)
        if cfg.influx is not None and command != "run":
            problems += cfg.influx.file_problems()
        if problems:
            raise ConfigError("; ".join(dict.fromkeys(problems)))
        return self._warnings(command, today or datetime.now(timezone.utc).date())

    def _warnings(self, command: Command, today: date) -> list[str]:
        cfg = self.config
        out = [] if cfg.mqtt is None else cfg.mqtt.warnings()
        if command == "bridge":
            return out
        unsecured = [c.id for c in cfg.cncs if c.security.policy == "None"]
        if unsecured:
            out.append(f"OPC UA security policy None (no signature, no encryption) for CNC"
                       f"{'s' if len(unsecured) > 1 else ''} {', '.join(unsecured)}: set security.policy "
                       "Basic256Sha256 where the server offers it")
        used = {m.meter for m in cfg.machines}
        expired = [f"{m.id} (valid until {m.calibration.valid_until})" for m in cfg.meters
                   if m.id in used and m.calibration and m.calibration.valid_until and m.calibration.valid_until < today]
        if expired:
            out.append(f"meter calibration expired: {', '.join(expired)}; records of their jobs carry the flag "
                       "meter_calibration_expired")
        factors = sorted({m.emission_factor for m in cfg.machines})
        outside = []
        for fid in factors:
            f = cfg.emission_factors[fid]
            if f.valid_to and f.valid_to < today:
                outside.append(f"{fid} (valid until {f.valid_to})")
            elif f.valid_from and f.valid_from > today:
                outside.append(f"{fid} (valid from {f.valid_from})")
        if outside:
            out.append(f"emission factor not valid today: {', '.join(outside)}; records of jobs outside its "
                       "validity carry the flag factor_outside_validity")
        if cfg.machines and cfg.mqtt is None:
            out.append("no mqtt section: records are kept in the ledger and not published")
        return out


def parse(data: object, base: Path = Path("."), where: str = "config") -> Loaded:
    """Validate config ``data`` (what the YAML file holds) and load its profiles and node maps
    (relative paths from ``base``); ConfigError naming every field that is wrong. ``where``
    names the file in the errors about the whole of it."""
    if data is None:
        raise ConfigError(f"{where}: the file is empty (no settings)")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping (site: ..., machines: ...), "
                          f"not a {type(data).__name__}")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, show_input=True)) from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}: nested too deeply") from exc
    return Loaded(cfg, base)


def load(path: str | Path) -> Loaded:
    """Read, validate and resolve a config file; raise ConfigError naming what is wrong."""
    p = Path(path)
    return parse(load_yaml(p, "config"), p.parent, f"config {p}")


def json_schema() -> dict:
    return Config.model_json_schema()
