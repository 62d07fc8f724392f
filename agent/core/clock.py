"""The agent's two clocks: monotonic seconds for integration, UTC wall seconds for stamps.

Energy is always computed on the monotonic clock, so a wall-clock step (NTP) neither creates
nor destroys energy. Wall time is only used to stamp records and to place a device's own
timestamp (an OPC UA SourceTimestamp) on the monotonic axis.

A simulated plant may run faster than real time. ``Clock(speed=S, anchor=A)`` then makes both
clocks run S times faster from the wall instant A, so the agent and the simulators (which build
the same clock from the same two numbers) agree on time and on what a watt means. Real plants
use the default ``speed=1``, where both clocks are the system's own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    speed: float = 1.0
    anchor: float = 0.0
    """Wall time (s since epoch) from which a scaled clock runs fast; unused when speed is 1."""

    def mono(self) -> float:
        """Monotonic seconds (scaled), for durations and integration."""
        return time.monotonic() * self.speed

    def wall(self) -> float:
        """UTC seconds since the epoch (scaled from the anchor), for stamps."""
        if self.speed == 1.0:
            return time.time()
        return self.anchor + (time.time() - self.anchor) * self.speed

    def now(self) -> tuple[float, float]:
        """(mono, wall) read together."""
        return self.mono(), self.wall()

    def mono_of_wall(self, wall: float) -> float:
        """Place a wall timestamp on the monotonic axis, using the current offset."""
        mono, now = self.now()
        return mono - (now - wall)

    def wall_of_mono(self, mono: float) -> float:
        m, w = self.now()
        return w - (m - mono)

    def real_seconds(self, seconds: float) -> float:
        """Real seconds to wait for ``seconds`` of clock time."""
        return seconds / self.speed


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` (real) or until ``stop`` is set; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
        return True
    except asyncio.TimeoutError:
        return stop.is_set()


async def wait_any(event: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` or ``stop`` is set, or ``seconds`` (real) have passed."""
    waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
