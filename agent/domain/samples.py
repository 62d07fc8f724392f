"""Preallocated sample columns for the open jobs of one machine.

Meter samples and state changes are appended to NumPy arrays that grow by doubling and are
trimmed from the front once no open job needs them, so a machine costs a few arrays, not a
Python object per sample. Views handed to the kernels are contiguous slices.
"""

from __future__ import annotations

import numpy as np


class SampleBuffer:
    """Columns t (monotonic s), e (counter kWh, NaN = none) and p (W, NaN = none)."""

    def __init__(self, capacity: int = 1024):
        self.t = np.empty(capacity, np.float64)
        self.e = np.empty(capacity, np.float64)
        self.p = np.empty(capacity, np.float64)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def last_t(self) -> float:
        return float(self.t[self.n - 1]) if self.n else float("-inf")

    def append(self, t: float, e: float, p: float) -> None:
        if self.n == len(self.t):
            cap = 2 * len(self.t)
            for name in ("t", "e", "p"):
                col = np.empty(cap, np.float64)
                col[: self.n] = getattr(self, name)[: self.n]
                setattr(self, name, col)
        self.t[self.n], self.e[self.n], self.p[self.n] = t, e, p
        self.n += 1

    def trim_before(self, t: float) -> None:
        """Drop samples before the last one at or before ``t`` (which is kept)."""
        k = int(np.searchsorted(self.t[: self.n], t, side="right")) - 1
        if k <= 0:
            return
        m = self.n - k
        for col in (self.t, self.e, self.p):
            col[:m] = col[k : self.n]
        self.n = m

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.t[: self.n], self.e[: self.n], self.p[: self.n]


class StateTimeline:
    """State changes: times (monotonic s) and uint8 state codes, one entry per change."""

    def __init__(self, capacity: int = 64):
        self.t = np.empty(capacity, np.float64)
        self.s = np.empty(capacity, np.uint8)
        self.n = 0

    @property
    def current(self) -> int | None:
        return int(self.s[self.n - 1]) if self.n else None

    def state_at(self, t: float) -> int | None:
        k = int(np.searchsorted(self.t[: self.n], t, side="right")) - 1
        return int(self.s[max(k, 0)]) if self.n else None

    def append(self, t: float, state: int) -> bool:
        """Record that the state is ``state`` from ``t`` on; False when that changes nothing.

        Changes normally arrive in time order. One stamped earlier than the last entry (a CNC
        change placed at its SourceTimestamp after a power-threshold change seen at a later meter
        sample) is inserted at its own time; at an existing instant the latest state wins.
        """
        if self.n == 0 or t > self.t[self.n - 1]:
            if self.n and self.s[self.n - 1] == state:
                return False
            self._grow()
            self.t[self.n], self.s[self.n] = t, state
            self.n += 1
            return True
        k = int(np.searchsorted(self.t[: self.n], t, side="left"))
        if self.t[k] == t:
            if self.s[k] == state:
                return False
            self.s[k] = state
            return True
        if k > 0 and self.s[k - 1] == state:
            return False
        self._grow()
        self.t[k + 1 : self.n + 1] = self.t[k : self.n].copy()
        self.s[k + 1 : self.n + 1] = self.s[k : self.n].copy()
        self.t[k], self.s[k] = t, state
        self.n += 1
        return True

    def replace_from(self, t: float, state: int) -> None:
        """The state is ``state`` from ``t`` on, whatever was recorded after t (a state known
        only from a snapshot taken after an outage replaces what was assumed meanwhile)."""
        self.n = int(np.searchsorted(self.t[: self.n], t, side="left"))
        self.append(t, state)

    def _grow(self) -> None:
        if self.n == len(self.t):
            t2 = np.empty(2 * self.n, np.float64)
            s2 = np.empty(2 * self.n, np.uint8)
            t2[: self.n], s2[: self.n] = self.t, self.s
            self.t, self.s = t2, s2

    def trim_before(self, t: float) -> None:
        k = int(np.searchsorted(self.t[: self.n], t, side="right")) - 1
        if k <= 0:
            return
        m = self.n - k
        self.t[:m] = self.t[k : self.n]
        self.s[:m] = self.s[k : self.n]
        self.n = m

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self.t[: self.n], self.s[: self.n]
