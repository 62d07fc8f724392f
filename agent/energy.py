"""Energy of a job window from meter samples and a state timeline (numba kernels).

Method, per sample interval [t_i, t_i+1] that overlaps the window [t0, t1]:

1. **Counter delta first.** The meter's energy counter integrates through everything, so when
   both readings are valid the delta is *measured* energy, even across a long gap (the gap is
   still counted). A delta that is negative is a wrap (``rollover_kwh``) when adding the wrap
   value makes it plausible (within the power limit, or with no limit known under 1 % of the
   counter's range), otherwise a counter reset; a delta above 1.5 x ``max_power_w`` x dt
   is an implausible jump. Resets and jumps never become energy.
2. **Power fallback.** Otherwise, if both power readings are valid and dt <= ``max_gap_s``, the
   power model below is integrated (W s / 3.6e6); this energy is also reported as estimated.
3. **Nothing.** Otherwise that part of the window is uncovered and counted as a gap. Energy is
   never invented for it, and parts of the window before the first or after the last sample are
   uncovered too.

Allocation weights. A delta is split over sub-segments (cut at state changes and at t0/t1) by
the integral of a power model over each: within one state, power is linear between p_i and
p_i+1 (trapezoid, exact for ramps); across state changes it is a step model, the leading
sub-segments in the state of t_i take p_i, the trailing ones in the state of t_i+1 take p_i+1,
middle ones their mean (exact for piecewise-constant power sampled in each state). Negative
power counts as 0; without two valid powers, or with zero total weight, time is the weight.

The kernel is O(samples in the window + state changes in it): the first interval is found by
binary search and the state timeline is walked with a pointer that only moves forward.
``compute_job`` validates inputs and wraps the result; ``warm_up`` compiles (or loads from
cache) the kernels so that no poll ever waits for the compiler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from agent.states import N_STATES

# Quality vector indices (q).
Q_COVERED_S = 0  # seconds of the window covered by counter deltas or power integration
Q_GAPS = 1  # intervals with dt > max_gap_s or without energy, plus uncovered window edges
Q_LONGEST_GAP_S = 2
Q_RESETS = 3
Q_ROLLOVERS = 4
Q_JUMPS = 5
Q_COUNTER_KWH = 6  # energy from counter deltas
Q_POWER_KWH = 7  # energy from power integration (estimated)
Q_WINDOW_S = 8
Q_COUNTER_S = 9  # seconds of the window covered by counter deltas
Q_POWER_S = 10  # seconds of the window covered by power integration
NQ = 11

# Never 'nnan' or 'ninf': NaN marks an invalid reading and must survive np.isfinite checks.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_KWH_PER_WS = 1.0 / 3.6e6


@numba.njit(cache=True, fastmath=FASTMATH)
def _model_ws(x, y, a, b, pa, pb, lead_end, trail_start, step):
    """Integral (W s) of the interval's power model over [x, y], a <= x <= y <= b."""
    if step:
        pm = 0.5 * (pa + pb)
        return (pa * max(0.0, min(y, lead_end) - x)
                + pm * max(0.0, min(y, trail_start) - max(x, lead_end))
                + pb * max(0.0, y - max(x, trail_start)))
    slope = (pb - pa) / (b - a)
    return 0.5 * (y - x) * (2.0 * pa + slope * ((x - a) + (y - a)))


@numba.njit(cache=True, fastmath=FASTMATH)
def _gap(q, length):
    q[Q_GAPS] += 1.0
    q[Q_LONGEST_GAP_S] = max(q[Q_LONGEST_GAP_S], length)


@numba.njit(cache=True, fastmath=FASTMATH)
def job_energy(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w):
    """Energy by state of window [t0, t1]: (kwh[N_STATES], est_kwh[N_STATES], q[NQ]).

    Inputs must be valid (see ``compute_job``): t strictly increasing, st_t sorted and
    non-empty, st_s < N_STATES.
    """
    kwh = np.zeros(N_STATES)
    est = np.zeros(N_STATES)
    q = np.zeros(NQ)
    q[Q_WINDOW_S] = t1 - t0
    one = np.uintp(1)
    n = np.uintp(t.size)
    m = np.uintp(st_t.size)
    if t1 <= t0:
        return kwh, est, q
    if n < 2 or t1 <= t[0] or t0 >= t[n - one]:
        _gap(q, t1 - t0)
        return kwh, est, q
    complete = True  # no part of the window uncovered
    if t0 < t[0]:
        _gap(q, t[0] - t0)
        complete = False
    if t1 > t[n - one]:
        _gap(q, t1 - t[n - one])
        complete = False
    kwh_per_s_limit = 1.5 * max_power_w / 3.6e6
    i = np.uintp(max(np.searchsorted(t, t0, side="right") - 1, 0))
    j = np.uintp(max(np.searchsorted(st_t, t[i], side="right") - 1, 0))
    while i + one < n and t[i] < t1:
        a = t[i]
        b = t[i + one]
        dt = b - a
        lo = max(a, t0)
        hi = min(b, t1)
        while j + one < m and st_t[j + one] <= a:
            j += one

        # States: s_a at t_i, s_b at t_i+1; lead_end ends the leading run of s_a, trail_start
        # begins the trailing run of s_b (b when there is none).
        s_a = st_s[j]
        s_b = s_a
        k = j + one
        while k < m and st_t[k] <= b:
            s_b = st_s[k]
            k += one
        lead_end = b
        trail_start = a if s_a == s_b else b
        k = j + one
        while k < m and st_t[k] < b:
            if st_s[k] != s_a and lead_end == b:
                lead_end = st_t[k]
            if st_s[k] != s_b:
                trail_start = b
            elif trail_start == b:
                trail_start = st_t[k]
            k += one
        step = not (lead_end == b and s_a == s_b)

        pa = p[i]
        pb = p[i + one]
        powered = np.isfinite(pa) and np.isfinite(pb)
        if powered:
            pa = max(pa, 0.0)
            pb = max(pb, 0.0)

        # Classify the interval: counter delta, power integration, or nothing.
        counter = False
        if np.isfinite(e[i]) and np.isfinite(e[i + one]):
            delta = e[i + one] - e[i]
            limit = kwh_per_s_limit * dt
            if delta < 0.0:
                delta += rollover_kwh
                # A wrap leaves the counter near zero having been near the top: the wrapped
                # delta must be plausible for the meter's power, and (power unknown) a small
                # part of the range, so a reset to 0 from mid-range is never read as a wrap.
                plausible = delta <= limit if max_power_w > 0.0 else delta <= 0.01 * rollover_kwh
                if rollover_kwh > 0.0 and delta >= 0.0 and plausible:
                    counter = True
                    q[Q_ROLLOVERS] += 1.0
                else:
                    q[Q_RESETS] += 1.0
            elif max_power_w > 0.0 and delta > limit:
                q[Q_JUMPS] += 1.0
            else:
                counter = True
        if counter:
            total = _model_ws(a, b, a, b, pa, pb, lead_end, trail_start, step) if powered else 0.0
            if not total > 0.0:  # time weights
                pa = 1.0
                pb = 1.0
                step = False
                total = dt
            scale = delta / total
            q[Q_COUNTER_S] += hi - lo
            if dt > max_gap_s:
                _gap(q, dt)
        elif powered and dt <= max_gap_s:
            scale = _KWH_PER_WS
            q[Q_POWER_S] += hi - lo
        else:
            _gap(q, dt)
            complete = False
            i += one
            continue
        q[Q_COVERED_S] += hi - lo

        # Allocate to the sub-segments of [lo, hi], split at state changes.
        k = j
        while k + one < m and st_t[k + one] <= lo:
            k += one
        x = lo
        interval_kwh = 0.0
        while True:
            y = st_t[k + one] if k + one < m and st_t[k + one] < hi else hi
            part = scale * _model_ws(x, y, a, b, pa, pb, lead_end, trail_start, step)
            kwh[st_s[k]] += part
            if not counter:
                est[st_s[k]] += part
            interval_kwh += part
            if y >= hi:
                break
            x = y
            k += one
        q[Q_COUNTER_KWH if counter else Q_POWER_KWH] += interval_kwh
        i += one
    if complete:  # exactly the window, not a sum of parts that may round below it
        q[Q_COVERED_S] = t1 - t0
    return kwh, est, q


@dataclass(frozen=True)
class JobEnergy:
    kwh_by_state: tuple[float, ...]
    """kWh per operating state; the index is the state code (``agent.states.STATES``)."""
    kwh: float
    estimated_kwh: float
    """Part of ``kwh`` from power integration rather than counter deltas."""
    method: str
    """"counter", "power", "mixed", or "none" (no part of the window covered)."""
    coverage: float
    """Covered share of the window, 1.0 for a zero-length window."""
    gap_count: int
    longest_gap_s: float
    counter_resets: int
    counter_rollovers: int
    counter_jumps: int


def _column(name: str, x, dtype) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    # A read-only array is a different numba type: it would compile a second specialisation.
    return a if a.flags.writeable else a.copy()


def _number(name: str, x, minimum: float | None = None) -> float:
    v = float(x)
    if math.isnan(v) or (minimum is None and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x!r}")
    return v


def compute_job(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh=0.0, max_power_w=0.0) -> JobEnergy:
    """Validate and normalise the inputs, run ``job_energy`` and summarise its result."""
    t, e, p = _column("t", t, np.float64), _column("e", e, np.float64), _column("p", p, np.float64)
    if not len(t) == len(e) == len(p):
        raise ValueError(f"t, e and p must have the same length, got {len(t)}, {len(e)}, {len(p)}")
    if not np.all(np.isfinite(t)):
        raise ValueError("t (sample times) must be finite")
    if len(t) > 1 and not np.all(np.diff(t) > 0):
        k = int(np.argmin(np.diff(t) > 0))
        raise ValueError(f"t (sample times) must be strictly increasing: t[{k}]={t[k]!r}, t[{k + 1}]={t[k + 1]!r}")
    st_t = _column("st_t", st_t, np.float64)
    codes = np.asarray(st_s)
    if len(st_t) == 0 or len(st_t) != len(codes):
        raise ValueError(f"st_t and st_s must be non-empty and of the same length, got {len(st_t)}, {len(codes)}")
    if not np.all(np.isfinite(st_t)) or np.any(np.diff(st_t) < 0):
        raise ValueError("st_t (state change times) must be finite and sorted")
    if codes.dtype.kind not in "ui" or codes.min() < 0 or codes.max() >= N_STATES:
        raise ValueError(f"st_s must hold integer state codes in [0, {N_STATES})")
    st_s = _column("st_s", codes, np.uint8)
    t0, t1 = _number("t0", t0), _number("t1", t1)
    if t1 < t0:
        raise ValueError(f"job window ends before it starts: t0={t0!r} > t1={t1!r}")
    max_gap_s = _number("max_gap_s", max_gap_s, 0.0)
    rollover_kwh = _number("rollover_kwh", rollover_kwh, 0.0)
    max_power_w = _number("max_power_w", max_power_w, 0.0)

    kwh, est, q = job_energy(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w)
    window, covered = q[Q_WINDOW_S], q[Q_COVERED_S]
    # By the source of the energy; when all covered parts had zero energy, by covered time.
    by_counter, by_power = q[Q_COUNTER_KWH], q[Q_POWER_KWH]
    if by_counter <= 0.0 and by_power <= 0.0:
        by_counter, by_power = q[Q_COUNTER_S], q[Q_POWER_S]
    if covered <= 0.0:
        method = "none"
    elif by_counter > 0.0 and by_power > 0.0:
        method = "mixed"
    else:
        method = "power" if by_power > 0.0 else "counter"
    return JobEnergy(
        kwh_by_state=tuple(float(x) for x in kwh),
        kwh=float(kwh.sum()),
        estimated_kwh=float(est.sum()),
        method=method,
        coverage=min(1.0, float(covered / window)) if window > 0.0 else 1.0,
        gap_count=int(q[Q_GAPS]),
        longest_gap_s=float(q[Q_LONGEST_GAP_S]),
        counter_resets=int(q[Q_RESETS]),
        counter_rollovers=int(q[Q_ROLLOVERS]),
        counter_jumps=int(q[Q_JUMPS]),
    )


def warm_up() -> None:
    """Compile (or load from cache) every kernel for the types ``compute_job`` passes."""
    t = np.array([0.0, 1.0, 2.0])
    st_s = np.zeros(1, np.uint8)
    job_energy(t, t.copy(), t.copy(), t[:1].copy(), st_s, 0.5, 1.5, 5.0, 0.0, 0.0)
