"""What a driver hands to the agent: one frozen object per poll or notification."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True, slots=True)
class Reading:
    """Decoded values of one device at one instant.

    ``t`` is on the agent's monotonic clock (seconds), ``wall`` the UTC stamp of the same
    instant. ``values`` maps quantity names (``power_w``, ``energy_import_kwh``, ``program``,
    ``channel_status``, ...) to decoded values; a quantity whose raw value was unusable
    (NaN, Bad status) is absent and named in ``bad``. ``error`` is set, and ``values`` empty,
    when the device did not answer at all.
    """

    device: str
    t: float
    wall: float
    values: Mapping[str, Any] = field(default_factory=dict)
    bad: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
