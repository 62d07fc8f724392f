"""What a driver hands to the agent: one frozen object per poll or notification."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Reading:
    """Decoded values of one device at one instant.

    ``t`` is on the agent's monotonic clock (seconds), ``wall`` the UTC stamp of the same
    instant. ``values`` maps quantity names (``power_w``, ``energy_import_kwh``, ``program``,
    ``channel_status``, ...) to decoded values. ``bad`` names every quantity whose value is not
    fully trusted, and ``reasons`` says why (quantity -> one of :data:`BAD_REASONS`): a quantity
    whose raw value was unusable (NaN, implausible, an OPC UA Bad status) is absent from
    ``values``; one whose reason is in :data:`USABLE_REASONS` (an OPC UA Uncertain status) keeps
    its value in ``values`` and is only flagged. ``error`` is set, and ``values`` empty, when the
    device did not answer at all.

    From a CNC (OPC UA), ``values`` is the device's whole state after this instant, and ``bad``
    names every point that is not Good at it (not only those that changed). ``stamps`` maps each
    point to the SourceTimestamp (UTC seconds since the epoch) the server reported for its
    current value, Bad ones included; a point is absent when the server sent none. ``initial``
    is True for the first snapshot of a connection (the first connect and every reconnect): the
    values of one Read request, stamped ``t``/``wall`` at their receipt, whatever happened
    before it; what changed while the agent was not connected shows only in ``stamps``. Every
    later reading is one instant, stamped with its SourceTimestamp (clamped between the previous
    reading and its arrival). Meters leave ``stamps`` empty and ``initial`` False.
    """

    device: str
    t: float
    wall: float
    values: Mapping[str, Any] = field(default_factory=dict)
    bad: tuple[str, ...] = ()
    error: str | None = None
    reasons: Mapping[str, str] = field(default_factory=dict)
    stamps: Mapping[str, float] = field(default_factory=dict)
    initial: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


BAD_REASONS = {
    "nan": "NaN",
    "inf": "infinite",
    "not_available": "the register type's 'not available' value",
    "implausible": "above the profile's max_power_w",
    "negative": "negative power on a consumption meter",
    "bad_status": "OPC UA status Bad",
    "uncertain_status": "OPC UA status Uncertain; value used",
}
"""Why a value is in ``Reading.bad``: code -> what it means (for messages)."""
USABLE_REASONS = frozenset({"uncertain_status"})
"""Reasons whose quantity keeps its value in ``Reading.values``: flagged, still used."""


class Availability:
    """One log line when a device (or one of its quantities) becomes unusable, one when it is
    usable again: never one per poll, and not two per flap.

    An outage starts at the first failed reading (the device: ``error``; a quantity: named in
    ``bad``). It ends only after ``back_after`` consecutive good readings, so a device that
    answers every other poll stays in one outage instead of logging each change; the ``back``
    line then says how long it lasted and how many readings failed. A reading without an answer
    tells nothing about the quantities: their outages neither start nor end on it.
    """

    def __init__(self, name: str, back_after: int = 3):
        self.name = name
        self.back_after = back_after
        self._down: dict[str | None, list[Any]] = {}
        """Subject (None: the device, else a quantity) -> [since, failed, good streak, first good]."""

    def update(self, r: Reading, now: float) -> list[tuple[int, str]]:
        """(logging level, message) lines this reading starts or ends; usually none."""
        out: list[tuple[int, str]] = []
        self._see(None, not r.ok, now, lambda: f"{self.name}: unavailable ({r.error})", out)
        if r.ok:
            for q in sorted(set(r.bad) | {q for q in self._down if q is not None}):
                code = r.reasons.get(q, "")
                why = BAD_REASONS.get(code, "unusable value")
                what = "uncertain" if code in USABLE_REASONS else "unavailable"
                self._see(q, q in r.bad, now, lambda q=q, why=why, what=what: f"{self.name}: {q} {what} ({why})", out)
        return out

    def _see(self, subject: str | None, failed: bool, now: float, message: Callable[..., str],
             out: list[tuple[int, str]]) -> None:
        # message() is called without arguments; ``...`` because mypy cannot infer a lambda
        # whose parameters bind loop variables as defaults against ``Callable[[], str]``.
        down = self._down.get(subject)
        if failed:
            if down is None:
                self._down[subject] = [now, 1, 0, None]
                out.append((logging.WARNING, message()))
            else:
                down[1] += 1
                down[2], down[3] = 0, None
            return
        if down is None:
            return
        down[2] += 1
        if down[3] is None:
            down[3] = now
        if down[2] >= self.back_after:
            del self._down[subject]
            what = f"{self.name}:" if subject is None else f"{self.name}: {subject}"
            out.append((logging.INFO, f"{what} back after {down[3] - down[0]:.1f} s ({down[1]} failed readings)"))

    @property
    def down(self) -> list[str | None]:
        """What is in an outage now (None: the device itself)."""
        return list(self._down)
