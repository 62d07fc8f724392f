"""Meter profiles and CNC node maps: device knowledge as data files, validated on load.

A *meter profile* (``drivers/profiles/NAME.yaml``) is a register map: for each quantity the
register address (0-based protocol address), function (``holding`` or ``input``), data type,
word/byte order, scale and offset. A *node map* (``drivers/nodemaps/NAME.yaml``) names the
OPC UA nodes of a CNC and the rules that turn their raw values into operating states.
Both formats are documented in the README of their folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from agent.states import STATES
from drivers import codec

HERE = Path(__file__).parent
PROFILE_DIR = HERE / "profiles"
NODEMAP_DIR = HERE / "nodemaps"

METER_QUANTITIES = {
    "power_w": "W",
    "energy_import_kwh": "kWh",
    "energy_export_kwh": "kWh",
    "voltage_l1_v": "V",
    "voltage_l2_v": "V",
    "voltage_l3_v": "V",
    "current_l1_a": "A",
    "current_l2_a": "A",
    "current_l3_a": "A",
    "frequency_hz": "Hz",
    "power_factor": "",
}
"""Quantities a profile may name, with the unit the decoded (scaled) value is in."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegisterPoint(_Model):
    address: int = Field(ge=0, le=65535, description="0-based protocol address (register 30001 or 40001 is address 0)")
    function: Literal["holding", "input"] = Field(description="holding registers (FC 3) or input registers (FC 4)")
    type: Literal["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"]
    scale: float = Field(1.0, description="decoded = raw * scale + offset, in the quantity's unit")
    offset: float = 0.0
    word_order: Literal["big", "little"] | None = None
    byte_order: Literal["big", "little"] | None = None

    @model_validator(mode="after")
    def _fits(self) -> "RegisterPoint":
        if self.address + codec.width(self.type) > 65536:
            raise ValueError(f"{self.type} at address {self.address} runs past register 65535")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self


class MeterProfile(_Model):
    name: str
    vendor: str
    model: str
    document: str = Field(description="the vendor document the register map comes from")
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    max_block: int = Field(125, ge=1, le=125, description="most registers read in one request")
    max_gap: int = Field(8, ge=0, le=124, description="unused registers a coalesced read may span")
    rollover_kwh: float | None = Field(
        None, gt=0, description="value at which the energy counter wraps; derived for unsigned integer counters"
    )
    max_power_w: float | None = Field(None, gt=0, description="largest plausible power (for checks)")
    points: dict[str, RegisterPoint]

    @field_validator("points")
    @classmethod
    def _known(cls, points: dict[str, RegisterPoint]) -> dict[str, RegisterPoint]:
        unknown = sorted(set(points) - set(METER_QUANTITIES))
        if unknown:
            raise ValueError(f"unknown quantities {unknown} (known: {', '.join(METER_QUANTITIES)})")
        if "power_w" not in points and "energy_import_kwh" not in points:
            raise ValueError("a profile needs power_w or energy_import_kwh")
        spans: list[tuple[int, int, str, str]] = sorted(
            (p.address, p.address + codec.width(p.type), p.function, q) for q, p in points.items()
        )
        for fn in ("holding", "input"):
            last_end, last_q = -1, ""
            for start, end, f, q in spans:
                if f != fn:
                    continue
                if start < last_end:
                    raise ValueError(f"{q} overlaps {last_q} in {fn} registers")
                last_end, last_q = end, q
        return points

    def order(self, q: str) -> tuple[str, str]:
        p = self.points[q]
        return (p.word_order or self.word_order, p.byte_order or self.byte_order)

    def counter_rollover_kwh(self) -> float:
        """Wrap value of the energy counter in kWh, 0.0 when it does not wrap (or is unknown)."""
        if self.rollover_kwh:
            return self.rollover_kwh
        p = self.points.get("energy_import_kwh")
        if p is not None and p.type.startswith("u"):
            return float(2 ** (16 * codec.width(p.type))) * abs(p.scale)
        return 0.0

    def counter_step_kwh(self) -> float:
        """Smallest step of the energy counter register near ``value`` (for tolerances)."""
        p = self.points.get("energy_import_kwh")
        if p is None:
            return 0.0
        return abs(p.scale) if p.type[0] in "ui" else 0.0


@dataclass(frozen=True, slots=True)
class Block:
    """One Modbus read request: registers [start, start+count) of one function."""

    function: str
    start: int
    count: int
    members: tuple[tuple[str, int, RegisterPoint], ...]
    """(quantity, offset into the block, point)."""


def plan_blocks(profile: MeterProfile, quantities: list[str] | None = None) -> list[Block]:
    """Coalesce points into as few reads as the profile's max_block / max_gap allow."""
    blocks: list[Block] = []
    names = quantities if quantities is not None else list(profile.points)
    for fn in ("input", "holding"):
        pts = sorted(((profile.points[q].address, q) for q in names if profile.points[q].function == fn))
        cur: list[tuple[str, int, RegisterPoint]] = []
        start = end = 0
        for addr, q in pts:
            p = profile.points[q]
            w = codec.width(p.type)
            if cur and addr - end <= profile.max_gap and addr + w - start <= profile.max_block:
                cur.append((q, addr - start, p))
                end = max(end, addr + w)
                continue
            if cur:
                blocks.append(Block(fn, start, end - start, tuple(cur)))
            start, end, cur = addr, addr + w, [(q, 0, p)]
        if cur:
            blocks.append(Block(fn, start, end - start, tuple(cur)))
    return blocks


def decode_block(profile: MeterProfile, block: Block, regs: list[int]) -> dict[str, float]:
    """Decode every member of a block from its registers into scaled values."""
    out: dict[str, float] = {}
    for q, off, p in block.members:
        wo, bo = profile.order(q)
        raw = codec.decode(regs[off : off + codec.width(p.type)], p.type, wo, bo)
        out[q] = raw * p.scale + p.offset
    return out


# ---------------------------------------------------------------------------------- node maps

Scalar = int | float | str | bool


class NodePoint(_Model):
    node: str = Field(description="node id: 'ns=2;s=…', 'ns=2;i=…' or 'nsu=URI;s=…'; {param} placeholders allowed")
    optional: bool = Field(False, description="missing on the server is not an error")


class StateRule(_Model):
    when: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    state: str

    @field_validator("state")
    @classmethod
    def _state(cls, v: str) -> str:
        if v not in STATES:
            raise ValueError(f"unknown state {v!r} (known: {', '.join(STATES)})")
        return v

    def matches(self, values: dict[str, Any]) -> bool:
        for name, want in self.when.items():
            have = values.get(name)
            if isinstance(want, list):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True


class JobRule(_Model):
    key: list[str] = Field(
        default_factory=lambda: ["job_id", "program"],
        description="points that identify a job; the first non-empty one is the job key",
    )
    active_states: list[str] = Field(
        default_factory=lambda: ["processing", "interrupted", "setup"],
        description="a job starts when the machine enters one of these with a job key",
    )
    end_on_parts_increment: bool = Field(True, description="a rising parts counter closes the job")
    end_on_idle: bool = Field(
        True, description="returning to ready/standby/off closes the job (program end, M30 reset)"
    )


class NodeMap(_Model):
    name: str
    spec: str = ""
    description: str = ""
    params: dict[str, str] = Field(default_factory=dict, description="placeholders a device must set, with their meaning")
    points: dict[str, NodePoint]
    states: list[StateRule]
    job: JobRule = Field(default_factory=JobRule)

    @model_validator(mode="after")
    def _consistent(self) -> "NodeMap":
        for i, rule in enumerate(self.states):
            for name in rule.when:
                if name not in self.points:
                    raise ValueError(f"states[{i}].when names unknown point {name!r}")
        if not self.states or self.states[-1].when:
            raise ValueError("the last state rule must have no 'when' (the default state)")
        for k in self.job.key:
            if k not in self.points:
                raise ValueError(f"job.key names unknown point {k!r}")
        return self

    def resolve(self, params: dict[str, str]) -> dict[str, str]:
        """Node id strings with placeholders filled from a device's params."""
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"node map {self.name!r} needs params {missing}")
        out = {}
        for q, p in self.points.items():
            try:
                out[q] = p.node.format(**params)
            except KeyError as exc:
                raise ValueError(f"point {q!r}: no param {exc.args[0]!r}") from None
        return out

    def state_of(self, values: dict[str, Any]) -> str:
        for rule in self.states:
            if rule.matches(values):
                return rule.state
        return self.states[-1].state


# ---------------------------------------------------------------------------------- loading


def _load(kind: str, directory: Path, ref: str, base: Path | None, model: type[BaseModel]) -> Any:
    path = Path(ref)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{ref}.yaml"
    elif not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"{kind} {ref!r} not found (built-in: {known}; or give a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text())
        return model.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{kind} {path}: {format_validation(exc)}") from exc


def load_profile(ref: str, base: Path | None = None) -> MeterProfile:
    return _load("meter profile", PROFILE_DIR, ref, base, MeterProfile)


def load_nodemap(ref: str, base: Path | None = None) -> NodeMap:
    return _load("node map", NODEMAP_DIR, ref, base, NodeMap)


def format_validation(exc: ValidationError) -> str:
    """pydantic errors as 'machines[2].meter: message' lines."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        if loc and re.match(r"^[A-Za-z_][\w.\[\]]*: ", msg):
            lines.append(f"{loc}.{msg}")  # a nested validator named a field below loc
        else:
            lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)
