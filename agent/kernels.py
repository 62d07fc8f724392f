"""The numba kernels behind ``agent.energy`` (method, weights and runs: see its docstring).

``job_energy`` is the per-job kernel the agent runs for every finished job; ``job_energy_batch``
and ``job_energy_batch_parallel`` compute many windows of one machine (a replay) with the same
code (``_window``), bit-identical per window. This module is the only one that imports numba:
the agent itself runs ``job_energy`` compiled ahead of time from this source (``agent.aot``)
when that build is present, so a gateway does not carry LLVM in memory.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from agent.energy import (NQ, Q_COUNTER_KWH, Q_COUNTER_S, Q_COVERED_S, Q_GAPS, Q_JUMPS, Q_LONGEST_GAP_S,
                          Q_POWER_KWH, Q_POWER_S, Q_RESETS, Q_ROLLOVERS, Q_WINDOW_S)
from agent.states import N_STATES


# No fast-math at all. Never 'nnan' or 'ninf': NaN marks an invalid reading and must survive
# np.isfinite checks. And no 'reassoc', 'contract' or 'arcp' either: with them LLVM may round
# the same source differently where it is inlined into another loop, and the batch kernels
# must give results bit-identical to ``job_energy`` so that a replay can compare with the
# ledger exactly. The fast path needs none of them (see ``_counter_run``).
FASTMATH: set[str] = set()
_KWH_PER_WS = 1.0 / 3.6e6
_f64 = np.float64  # every e and p read is widened first: float32 columns compute in float64
_BLOCK = 32  # intervals checked per step of a counter run: a fixed-length loop LLVM vectorises


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
def _plain_counter(ta, tb, ea, eb, klim, max_gap_s):
    """Interval whose counter delta is measured energy with nothing to count: both readings
    finite (``ea`` is known to be), no wrap, no reset, no jump, no gap. Branch-free (``&``)."""
    dt = tb - ta
    d = eb - ea
    return (abs(eb) < math.inf) & (d >= 0.0) & (d <= klim * dt) & (dt <= max_gap_s)


@numba.njit(cache=True, fastmath=FASTMATH)
def _counter_run(t, e, i, n, t1, next_change, klim, max_gap_s):
    """Last index r >= i such that every interval of [t_i, t_r] is a plain counter interval
    (``_plain_counter``) ending at or before t1 and before the next state change.

    The common case of a replay: such a run is one state, whole, and its energy is the
    counter difference e_r - e_i. Blocks of ``_BLOCK`` intervals are checked without an early
    exit so that the check vectorises; this loop reads t and e only (16 bytes per sample).
    """
    one = np.uintp(1)
    block = np.uintp(_BLOCK)
    r = i
    while r + block < n and t[r + block] <= t1 and t[r + block] < next_change:
        bad = np.uint8(0)
        for k in range(_BLOCK):
            x = r + np.uintp(k)
            bad |= np.uint8(not _plain_counter(t[x], t[x + one], _f64(e[x]), _f64(e[x + one]), klim, max_gap_s))
        if bad:
            break
        r += block
    # The tail before the bound (fewer than a block, or a block with a bad interval): find the
    # bound on t alone, check the intervals up to it in one vectorisable pass, step only if bad.
    s = r
    while s + one < n and s < r + block and t[s + one] <= t1 and t[s + one] < next_change:
        s += one
    bad = np.uint8(0)
    for x in range(r, s):
        bad |= np.uint8(not _plain_counter(t[x], t[x + one], _f64(e[x]), _f64(e[x + one]), klim, max_gap_s))
    if not bad:
        return s
    while r < s and _plain_counter(t[r], t[r + one], _f64(e[r]), _f64(e[r + one]), klim, max_gap_s):
        r += one
    return r


@numba.njit(cache=True, fastmath=FASTMATH)
def job_energy(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w):
    """Energy by state of window [t0, t1]: (kwh[N_STATES], est_kwh[N_STATES], q[NQ]).

    Inputs must be valid (see ``compute_job``): t strictly increasing, st_t sorted and
    non-empty, st_s < N_STATES.
    """
    kwh = np.zeros(N_STATES)
    est = np.zeros(N_STATES)
    q = np.zeros(NQ)
    _window(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q)
    return kwh, est, q


@numba.njit(cache=True, fastmath=FASTMATH)
def _window(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q):
    """``job_energy`` into zeroed rows kwh, est and q: one code path for one job and for a batch."""
    q[Q_WINDOW_S] = t1 - t0
    one = np.uintp(1)
    n = np.uintp(t.size)
    m = np.uintp(st_t.size)
    if t1 <= t0:
        return
    if n < 2 or t1 <= t[0] or t0 >= t[n - one]:
        _gap(q, t1 - t0)
        return
    complete = True  # no part of the window uncovered
    if t0 < t[0]:
        _gap(q, t[0] - t0)
        complete = False
    if t1 > t[n - one]:
        _gap(q, t1 - t[n - one])
        complete = False
    kwh_per_s_limit = 1.5 * max_power_w / 3.6e6
    klim = kwh_per_s_limit if max_power_w > 0.0 else math.inf  # the jump test as one compare
    i = np.uintp(max(np.searchsorted(t, t0, side="right") - 1, 0))
    j = np.uintp(max(np.searchsorted(st_t, t[i], side="right") - 1, 0))
    while i + one < n and t[i] < t1:
        a = t[i]
        while j + one < m and st_t[j + one] <= a:
            j += one

        # Fast path: a run of whole plain counter intervals in one state takes the counter
        # difference over the run (exact: no per-interval rounding, no weights needed).
        if a >= t0 and abs(e[i]) < math.inf:
            next_change = st_t[j + one] if j + one < m else math.inf
            r = _counter_run(t, e, i, n, t1, next_change, klim, max_gap_s)
            if r > i:
                run_kwh = _f64(e[r]) - _f64(e[i])
                run_s = t[r] - a
                kwh[st_s[j]] += run_kwh
                q[Q_COUNTER_KWH] += run_kwh
                q[Q_COUNTER_S] += run_s
                q[Q_COVERED_S] += run_s
                i = r
                continue

        b = t[i + one]
        dt = b - a
        lo = max(a, t0)
        hi = min(b, t1)

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

        pa = _f64(p[i])
        pb = _f64(p[i + one])
        powered = np.isfinite(pa) and np.isfinite(pb)
        if powered:
            pa = max(pa, 0.0)
            pb = max(pb, 0.0)

        # Classify the interval: counter delta, power integration, or nothing.
        counter = False
        if np.isfinite(e[i]) and np.isfinite(e[i + one]):
            delta = _f64(e[i + one]) - _f64(e[i])
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


@numba.njit(cache=True, fastmath=FASTMATH)
def _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, first, stop):
    for k in range(first, stop):
        _window(t, e, p, st_t, st_s, t0[k], t1[k], max_gap_s, rollover_kwh, max_power_w, kwh[k], est[k], q[k])


@numba.njit(cache=True, fastmath=FASTMATH)
def job_energy_batch(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q):
    """``job_energy`` of the windows [t0[k], t1[k]] of one machine, one thread, into zeroed
    kwh[jobs, N_STATES], est[jobs, N_STATES] and q[jobs, NQ]. Row k is bit-identical to
    ``job_energy`` of that window: the same code, with no fast-math that could round it
    differently. e and p may be float32 (a meter that delivers float32: exact in float64).
    """
    _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, 0, t0.size)


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def job_energy_batch_parallel(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q,
                              chunks):
    """``job_energy_batch`` with the jobs split into the ranges chunks[c]:chunks[c + 1], one
    per thread (``batch_chunks`` balances them by samples); each job is computed by one thread
    with the same code, so the rows are bit-identical to the one-thread kernel's."""
    for c in numba.prange(chunks.size - 1):
        _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q,
              chunks[c], chunks[c + 1])
