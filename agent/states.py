"""Operating states of a machine tool (ISO 14955-1 style) and their codes in sample buffers."""

from __future__ import annotations

STATES: tuple[str, ...] = ("off", "standby", "ready", "processing", "interrupted", "setup")
"""State names; the index of a name is its code (uint8) in buffers and kernels."""

CODE: dict[str, int] = {name: i for i, name in enumerate(STATES)}
N_STATES = len(STATES)


def code(name: str) -> int:
    try:
        return CODE[name]
    except KeyError:
        raise ValueError(f"unknown operating state {name!r} (known: {', '.join(STATES)})") from None
