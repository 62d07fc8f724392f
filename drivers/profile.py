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


ROOTS = {"Root": "i=84", "Objects": "i=85", "Types": "i=86", "Views": "i=87"}
"""Standard folders a browse path may start from by name (OPC 10000-5, 8.2)."""


@dataclass(frozen=True, slots=True)
class BrowsePath:
    """A node addressed by browse names from a start node, resolved at connect.

    ``start`` is a node id text (``i=84``, ``ns=…``, ``nsu=URI;…``); each element is
    (namespace, name) where the namespace is an index (int) or a namespace URI (str), the form
    that survives a server restart.
    """

    start: str
    elements: tuple[tuple[int | str, str], ...]

    def __str__(self) -> str:
        root = next((k for k, v in ROOTS.items() if v == self.start), self.start)
        parts = [f"{ns}:{name}" if isinstance(ns, int) else f"nsu={ns};{name}" for ns, name in self.elements]
        return "/".join([root, *parts])


NodeRef = str | BrowsePath
"""What a point resolves to: a node id text or a browse path."""

_INDEXED = re.compile(r"^(\d+):(.+)$")
_ALIASED = re.compile(r"^([A-Za-z_][\w-]*):(.+)$")


def _element(text: str, namespaces: dict[str, str]) -> tuple[int | str, str]:
    """'2:Name' (index), 'alias:Name' (a URI from the map's namespaces), 'nsu=URI;Name' or
    'Name' (namespace 0) as (namespace, name)."""
    if text.startswith("nsu="):
        uri, sep, name = text[4:].partition(";")
        if not sep or not uri or not name:
            raise ValueError(f"element {text!r}: expected 'nsu=URI;Name'")
        return uri, name
    if m := _INDEXED.match(text):
        return int(m.group(1)), m.group(2)
    if (m := _ALIASED.match(text)) and m.group(1) in namespaces:
        return namespaces[m.group(1)], m.group(2)
    if m:
        raise ValueError(f"element {text!r}: unknown namespace alias {m.group(1)!r} "
                         f"(the map's namespaces: {', '.join(namespaces) or 'none'})")
    if not text:
        raise ValueError("empty path element")
    return 0, text


class NodePoint(_Model):
    node: str | None = Field(None, description="node id: 'ns=2;s=…', 'ns=2;i=…' or 'nsu=URI;s=…'; {param} placeholders allowed")
    path: str | list[str] | None = Field(None, description=(
        "browse path instead of a node id: 'Objects/ma:Machines/dev:{machine}/mt:Production/…' (elements "
        "'idx:Name', 'alias:Name' with an alias from namespaces, or 'Name' for namespace 0), or a list "
        "of elements (which may also be 'nsu=URI;Name'); from the Root folder, or from 'start'"))
    start: str | None = Field(None, description="node id the path starts from (default: the Root folder)")
    optional: bool = Field(False, description="missing on the server is not an error")

    @model_validator(mode="after")
    def _one(self) -> "NodePoint":
        if (self.node is None) == (self.path is None):
            raise ValueError("node: give node or path (one of them)")
        if self.start is not None and self.path is None:
            raise ValueError("start: only a path takes a start node")
        if self.path is not None and not self.path:
            raise ValueError("path: empty")
        return self

    def ref(self, params: dict[str, str], namespaces: dict[str, str]) -> NodeRef:
        """This point's node id or browse path with placeholders filled (KeyError: a missing param)."""
        if self.node is not None:
            return self.node.format_map(params)
        parts = self.path.split("/") if isinstance(self.path, str) else list(self.path)
        start = self.start.format_map(params) if self.start else None
        if start is None and isinstance(self.path, str) and parts[0] in ROOTS:
            start = ROOTS[parts.pop(0)]
        spaces = {k: v.format_map(params) for k, v in namespaces.items()}
        elements = tuple(_element(p.format_map(params), spaces) for p in parts)
        if not elements:
            raise ValueError("no element after the start node")
        return BrowsePath(start or ROOTS["Root"], elements)


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
    namespaces: dict[str, str] = Field(default_factory=dict, description=(
        "aliases for browse path elements: alias -> namespace URI ({param} placeholders allowed)"))
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
        for q, p in self.points.items():
            if p.path is not None:
                try:
                    p.ref(_Echo(), self.namespaces)
                except ValueError as exc:
                    raise ValueError(f"points.{q}.path: {exc}") from None
        return self

    def resolve(self, params: dict[str, str]) -> dict[str, NodeRef]:
        """Node id strings (or browse paths) with placeholders filled from a device's params."""
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"node map {self.name!r} needs params {missing}")
        out = {}
        for q, p in self.points.items():
            try:
                out[q] = p.ref(params, self.namespaces)
            except KeyError as exc:
                raise ValueError(f"point {q!r}: no param {exc.args[0]!r}") from None
            except ValueError as exc:
                raise ValueError(f"point {q!r}: {exc}") from None
        return out

    def state_of(self, values: dict[str, Any]) -> str:
        for rule in self.states:
            if rule.matches(values):
                return rule.state
        return self.states[-1].state


class _Echo(dict):
    """Params that fill every placeholder with its own name (to check a map without a device)."""

    def __missing__(self, key: str) -> str:
        return key


# ---------------------------------------------------------------------------------- loading


_LOADED: dict[tuple, Any] = {}


def _load(kind: str, directory: Path, ref: str, base: Path | None, model: type[BaseModel]) -> Any:
    path = Path(ref)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{ref}.yaml"
    elif not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"{kind} {ref!r} not found (built-in: {known}; or give a path to a .yaml file)")
    # Thousands of meters share a few profiles: parse each file once (the models are frozen).
    key = (model, str(path.resolve()), path.stat().st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    try:
        data = yaml.safe_load(path.read_text())
        _LOADED[key] = loaded = model.model_validate(data)
        return loaded
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
