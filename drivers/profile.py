"""Meter profiles: a meter's register map as a data file (``drivers/profiles/NAME.yaml``),
validated on load, and the coalesced reads planned from it (and split again for a meter that
refuses a request spanning registers it does not map).

For each quantity: the register address (0-based protocol address), function (``holding`` or
``input``), data type, word/byte order, scale and offset. The format is documented in
drivers/profiles/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from energy_agent.core.validation import Model
from energy_agent.drivers import codec
from energy_agent.drivers.datafile import load_model

PROFILE_DIR = Path(__file__).parent / "profiles"

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


class RegisterPoint(Model):
    address: int = Field(ge=0, le=65535, description="0-based protocol address (register 30001 or 40001 is address 0)")
    function: Literal["holding", "input"] = Field(description="holding registers (FC 3) or input registers (FC 4)")
    type: Literal["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"]
    scale: float = Field(1.0, description="decoded = raw * scale + offset, in the quantity's unit")
    offset: float = 0.0
    word_order: Literal["big", "little"] | None = None
    byte_order: Literal["big", "little"] | None = None

    @model_validator(mode="after")
    def _fits(self) -> RegisterPoint:
        if self.address + codec.width(self.type) > 65536:
            raise ValueError(f"{self.type} at address {self.address} runs past register 65535")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self


class MeterProfile(Model):
    name: str
    vendor: str
    model: str
    document: str = Field(description="the vendor document the register map comes from")
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    max_block: int = Field(125, ge=1, le=125, description="most registers read in one request")
    max_gap: int = Field(8, ge=0, le=124, description=(
        "registers no point of this profile maps that one request may span to read two points together; "
        "0 for a meter that refuses reads touching registers it does not map (exception 2)"))
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

    def counter_is_float32(self) -> bool:
        """Whether the energy counter is read as a 32-bit float (its resolution shrinks as it grows)."""
        p = self.points.get("energy_import_kwh")
        return p is not None and p.type == "f32"

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

    @property
    def span(self) -> str:
        """``input 52..73``: the function and the first and last register read."""
        return f"{self.function} {self.start}..{self.start + self.count - 1}"

    @property
    def gaps(self) -> bool:
        """Whether the request spans registers that none of its points occupies."""
        return sum(codec.width(p.type) for _, _, p in self.members) < self.count


def plan_blocks(profile: MeterProfile, quantities: list[str] | None = None) -> list[Block]:
    """Coalesce points into as few reads as the profile's max_block / max_gap allow."""
    blocks: list[Block] = []
    names = quantities if quantities is not None else list(profile.points)
    for fn in ("input", "holding"):
        pts = sorted((profile.points[q].address, q) for q in names if profile.points[q].function == fn)
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


def split_block(block: Block) -> list[Block]:
    """The smaller requests to try when a meter refuses ``block``: its runs of adjacent points
    (no unmapped register in between) when it spans a gap, else each point on its own. A
    block of one point cannot be split (an empty list)."""
    if len(block.members) < 2:
        return []
    if not block.gaps:
        return [Block(block.function, block.start + off, codec.width(p.type), ((q, 0, p),))
                for q, off, p in block.members]
    runs: list[list[tuple[str, int, RegisterPoint]]] = []
    end = -1
    for q, off, p in sorted(block.members, key=lambda m: m[1]):
        if runs and off == end:
            runs[-1].append((q, off, p))
        else:
            runs.append([(q, off, p)])
        end = off + codec.width(p.type)
    out = []
    for run in runs:
        first = run[0][1]
        last = run[-1][1] + codec.width(run[-1][2].type)
        out.append(Block(block.function, block.start + first, last - first,
                         tuple((q, off - first, p) for q, off, p in run)))
    return out


def decode_block(profile: MeterProfile, block: Block, regs: list[int]) -> dict[str, float]:
    """Decode every member of a block from its registers into scaled values."""
    out: dict[str, float] = {}
    for q, off, p in block.members:
        wo, bo = profile.order(q)
        raw = codec.decode(regs[off : off + codec.width(p.type)], p.type, wo, bo)
        out[q] = raw * p.scale + p.offset
    return out


def load_profile(ref: str, base: Path | None = None) -> MeterProfile:
    """A built-in profile by name, or a profile file (relative to ``base``)."""
    return load_model("meter profile", PROFILE_DIR, ref, base, MeterProfile)
