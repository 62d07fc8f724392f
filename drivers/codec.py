"""Modbus register encoding: data types, word order and byte order.

Registers are 16-bit words. A 32- or 64-bit value spans 2 or 4 registers; ``word_order``
says whether the most significant word comes first (``big``, the Modbus convention) or last
(``little``, "word swapped"); ``byte_order`` says whether each register holds its high byte
first (``big``, standard) or is byte swapped (``little``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal

TYPES: dict[str, tuple[str, int]] = {
    # type: (struct code, registers)
    "u16": ("H", 1),
    "i16": ("h", 1),
    "u32": ("I", 2),
    "i32": ("i", 2),
    "u64": ("Q", 4),
    "i64": ("q", 4),
    "f32": ("f", 2),
    "f64": ("d", 4),
}

Order = Literal["big", "little"]


def width(type_: str) -> int:
    """Registers a value of ``type_`` occupies."""
    return TYPES[type_][1]


def decode(regs: Sequence[int], type_: str, word_order: Order = "big", byte_order: Order = "big") -> int | float:
    """Decode the registers of one value."""
    code, n = TYPES[type_]
    if len(regs) != n:
        raise ValueError(f"{type_} needs {n} registers, got {len(regs)}")
    words = list(regs) if word_order == "big" else list(reversed(regs))
    raw = b"".join(w.to_bytes(2, "big" if byte_order == "big" else "little") for w in words)
    return struct.unpack(">" + code, raw)[0]


def encode(value: int | float, type_: str, word_order: Order = "big", byte_order: Order = "big") -> list[int]:
    """Encode one value into registers (the inverse of :func:`decode`)."""
    code, _ = TYPES[type_]
    if code in "fd":
        raw = struct.pack(">" + code, float(value))
    else:
        raw = struct.pack(">" + code, int(value))
    words = [int.from_bytes(raw[i : i + 2], "big" if byte_order == "big" else "little") for i in range(0, len(raw), 2)]
    return words if word_order == "big" else list(reversed(words))


def not_available(raw: int | float, type_: str) -> bool:
    """Whether a decoded raw integer is its type's 'not available' marker: the most negative
    value of a signed type (0x8000…), all ones for an unsigned one (0xFFFF…). Meters (and
    SunSpec) send it where a float register would hold NaN. Floats: never (NaN is checked as such)."""
    code, n = TYPES[type_]
    if code in "fd":
        return False
    bits = 16 * n
    return raw == (-(2 ** (bits - 1)) if code.islower() else 2**bits - 1)
