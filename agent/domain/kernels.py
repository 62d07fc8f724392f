"""The numba kernels behind ``energy_agent.domain.energy`` (method, weights and runs: see its docstring).

``job_energy`` is the per-job kernel the agent runs for every finished job; ``job_energy_batch``
and ``job_energy_batch_parallel`` compute many windows of one machine (a replay) with the same
code (``_jobs``), so that each row is bit-identical to ``job_energy`` of its window. Every
function here is a plain ``numba.njit(cache=True)``: compiled once, then loaded from numba's
cache. This module is the only one that imports numba.

Indices are unsigned (``np.uintp``): numba then needs no wrap-around check for negative indices
on each array access, which keeps the check of a counter run (``_block_bad``) one vectorised
loop. Mixing them with signed integers would make numba compute in float64, so every index
variable is built from ``np.uintp`` values.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from energy_agent.core.states import N_STATES
from energy_agent.domain.energy import (
    NQ,
    Q_COUNTER_KWH,
    Q_COUNTER_S,
    Q_COVERED_S,
    Q_GAPS,
    Q_JUMPS,
    Q_LONGEST_GAP_S,
    Q_POWER_KWH,
    Q_POWER_S,
    Q_RESETS,
    Q_ROLLOVERS,
    Q_WINDOW_S,
)

# No fast-math at all. Never 'nnan' or 'ninf': NaN marks an invalid reading and must survive
# the finiteness checks. And no 'reassoc', 'contract' or 'arcp' either: with them LLVM may round
# the same source differently where it is inlined into another loop, and the batch kernels must
# give results bit-identical to ``job_energy``, so that a replay can compare with the ledger.
FASTMATH: set[str] = set()
_KWH_PER_WS = 1.0 / 3.6e6
_f64 = np.float64  # every e and p read is widened first: float32 columns compute in float64
_BLOCK = 64  # intervals checked per step of a counter run: a fixed-length loop LLVM vectorises
_MAX = float(np.finfo(np.float64).max)


@numba.njit(cache=True, fastmath=FASTMATH)
def job_energy(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w):
    """Energy by state of window [t0, t1]: (kwh[N_STATES], est_kwh[N_STATES], q[NQ]).

    Inputs must be valid (see ``compute_job``): t strictly increasing, st_t sorted and
    non-empty, st_s < N_STATES. The batch of one window: the same compiled code as a row of
    ``job_energy_batch`` with float64 e and p.
    """
    kwh = np.zeros((1, N_STATES))
    est = np.zeros((1, N_STATES))
    q = np.zeros((1, NQ))
    _jobs(t, e, p, st_t, st_s, np.array([t0]), np.array([t1]), max_gap_s, rollover_kwh, max_power_w, kwh, est, q,
          0, 1)
    return kwh[0], est[0], q[0]


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
    """``job_energy_batch`` on numba's threads: the jobs chunks[c]:chunks[c + 1] are one iteration
    of a ``prange`` (``batch_chunks`` cuts them into ranges of about equal samples, one per
    thread). Each job is computed by one thread with the same code, so the rows are
    bit-identical to the one-thread kernel's, whatever the split."""
    for c in numba.prange(chunks.size - 1):
        _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q,
              chunks[c], chunks[c + 1])


@numba.njit(cache=True, fastmath=FASTMATH)
def _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, first, stop):
    """``job_energy`` of the windows first..stop-1 into the zeroed rows of kwh, est and q: the one
    code path of every kernel. Each window's first sample and state are searched from where the
    last window ended (any start gives the same result).

    The windows are a loop here rather than a call each: numba counts references to the
    arrays a call passes, and those atomic operations stall the stream of loads (and contend
    between threads). ``_interval`` pays them, but it runs only where an interval is split or
    is not plain.
    """
    one = np.uintp(1)
    n = np.uintp(t.size)
    m = np.uintp(st_t.size)
    klim = 1.5 * max_power_w / 3.6e6 if max_power_w > 0.0 else math.inf  # the jump test as one compare
    i = j = np.uintp(0)
    for row in range(first, stop):
        w0, w1 = t0[row], t1[row]
        q[row, Q_WINDOW_S] = w1 - w0
        if w1 <= w0:
            continue
        if n < 2 or w1 <= t[0] or w0 >= t[n - one]:
            _gap(q, row, w1 - w0)
            continue
        complete = True  # no part of the window uncovered
        if w0 < t[0]:
            _gap(q, row, t[0] - w0)
            complete = False
        if w1 > t[n - one]:
            _gap(q, row, w1 - t[n - one])
            complete = False
        i = _last_at_or_before(t, w0, i)
        j = _last_at_or_before(st_t, t[i], j)
        while i + one < n and t[i] < w1:
            a = t[i]
            while j + one < m and st_t[j + one] <= a:
                j += one

            # A run of whole plain counter intervals in one state takes the counter difference
            # over the run: exact, no per-interval rounding, no weights needed. An interval that
            # ends past ``end`` (split by a state change or by the window's end) starts no run.
            if a >= w0 and abs(e[i]) < math.inf:
                end = min(w1, st_t[j + one]) if j + one < m else w1
                r = _counter_run(t, e, i, n, end, klim, max_gap_s) if t[i + one] <= end else i
                if r > i:
                    run_kwh = _f64(e[r]) - _f64(e[i])
                    run_s = t[r] - a
                    kwh[row, st_s[j]] += run_kwh
                    q[row, Q_COUNTER_KWH] += run_kwh
                    q[row, Q_COUNTER_S] += run_s
                    q[row, Q_COVERED_S] += run_s
                    i = r
                    continue

            if not _interval(t, e, p, st_t, st_s, i, j, w0, w1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q,
                             row):
                complete = False
            i += one
        if complete:  # exactly the window, not a sum of parts that may round below it
            q[row, Q_COVERED_S] = w1 - w0


@numba.njit(cache=True, fastmath=FASTMATH)
def _last_at_or_before(a, x, h):
    """max(searchsorted(a, x, side="right") - 1, 0) for sorted a, searched outwards from index h
    (galloping): a batch of windows in time order finds each start in a few steps near where the
    last window ended, where a binary search over all of a would miss the cache at most steps."""
    zero, one = np.uintp(0), np.uintp(1)
    n = np.uintp(a.size)
    if not x == x:  # NaN: numpy's order, in which NaN is last
        return np.uintp(max(np.searchsorted(a, x, side="right") - 1, 0))
    lo = min(h, n - one)  # find a[lo] <= x < a[hi], taking a[n] as +inf
    hi = lo + one
    step = one
    while lo > zero and a[lo] > x:  # backwards
        hi = lo
        lo = lo - step if lo > step else zero
        step += step
    while hi < n and a[hi] <= x:  # forwards
        lo = hi
        hi = min(hi + step, n)
        step += step
    while hi - lo > one:  # bisect; when a[0] > x, lo stays 0
        mid = lo + ((hi - lo) >> one)
        if a[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


@numba.njit(cache=True, fastmath=FASTMATH)
def _counter_run(t, e, i, n, end, klim, max_gap_s):
    """Last index r >= i such that every interval of [t_i, t_r] is a plain counter interval
    (``_plain_counter``) and t_r <= end (t1, or the next state change if that is earlier).

    The common case of a replay: such a run is one state, whole, and its energy is the counter
    difference e_r - e_i. An interval that ends exactly on a state change belongs to the run:
    the change takes effect at its end, so all of it is in the run's state. Whole blocks of
    ``_BLOCK`` intervals are checked while a block ends by ``end``, then the intervals of one
    more block that end by it. Only a block with a ``_suspect`` interval is stepped through
    interval by interval, and the run then ends in that block (at the first interval that is
    not plain, or at the block's end). This reads t and e only: 16 bytes per sample.
    """
    one = np.uintp(1)
    block = np.uintp(_BLOCK)
    r = i
    while r + block < n and t[r + block] <= end:
        if _block_bad(t, e, r, klim, max_gap_s):
            break
        r += block
    # The intervals from r, at most a block, that end by ``end`` (t increases: they come first).
    s = r
    bad = False
    for k in range(min(block, n - one - r)):
        y = r + np.uintp(k)
        inside = t[y + one] <= end
        s += np.uintp(inside)
        bad |= inside & _suspect(t, e, y, klim, max_gap_s)
    if not bad:
        return s
    while r < s and _plain_counter(t[r], t[r + one], _f64(e[r]), _f64(e[r + one]), klim, max_gap_s):
        r += one
    return r


@numba.njit(cache=True, fastmath=FASTMATH)
def _block_bad(t, e, x, klim, max_gap_s):
    """Whether any of the ``_BLOCK`` intervals from x is ``_suspect``: a fixed-length loop
    without an early exit, so that LLVM vectorises it."""
    bad = False
    for k in range(_BLOCK):
        bad |= _suspect(t, e, x + np.uintp(k), klim, max_gap_s)
    return bad


@numba.njit(cache=True, fastmath=FASTMATH)
def _suspect(t, e, y, klim, max_gap_s):
    """Whether interval y may not be plain (``not _plain_counter``), in a form that vectorises
    with fewer instructions: the jump limit is capped at the largest finite float, so that an
    infinite reading or difference fails a compare, as NaN fails every compare. Stricter, never
    looser: the two differ only where finite readings differ by more than the largest float."""
    one = np.uintp(1)
    dt = t[y + one] - t[y]
    d = _f64(e[y + one]) - _f64(e[y])
    lim = klim * dt
    lim = _MAX if _MAX < lim else lim
    return (not dt <= max_gap_s) | (not d >= 0.0) | (not d <= lim)


@numba.njit(cache=True, fastmath=FASTMATH)
def _plain_counter(ta, tb, ea, eb, klim, max_gap_s):
    """Interval whose counter delta is measured energy with nothing to count: both readings
    finite (``ea`` is known to be), no wrap, no reset, no jump, no gap."""
    dt = tb - ta
    d = eb - ea
    return (abs(eb) < math.inf) and d >= 0.0 and d <= klim * dt and dt <= max_gap_s


@numba.njit(cache=True, fastmath=FASTMATH)
def _interval(t, e, p, st_t, st_s, i, j, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, row):
    """Interval [t_i, t_i+1] of the window that is not part of a run, state j at t_i, by the
    general method (classification, power-model weights, split at state changes and t0/t1).
    Returns False when it is uncovered (a gap)."""
    one = np.uintp(1)
    m = np.uintp(st_t.size)
    kwh_per_s_limit = 1.5 * max_power_w / 3.6e6
    a = t[i]
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
                q[row, Q_ROLLOVERS] += 1.0
            else:
                q[row, Q_RESETS] += 1.0
        elif max_power_w > 0.0 and delta > limit:
            q[row, Q_JUMPS] += 1.0
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
        q[row, Q_COUNTER_S] += hi - lo
        if dt > max_gap_s:
            _gap(q, row, dt)
    elif powered and dt <= max_gap_s:
        scale = _KWH_PER_WS
        q[row, Q_POWER_S] += hi - lo
    else:
        _gap(q, row, dt)
        return False
    q[row, Q_COVERED_S] += hi - lo

    # Allocate to the sub-segments of [lo, hi], split at state changes.
    k = j
    while k + one < m and st_t[k + one] <= lo:
        k += one
    x = lo
    interval_kwh = 0.0
    while True:
        y = st_t[k + one] if k + one < m and st_t[k + one] < hi else hi
        part = scale * _model_ws(x, y, a, b, pa, pb, lead_end, trail_start, step)
        kwh[row, st_s[k]] += part
        if not counter:
            est[row, st_s[k]] += part
        interval_kwh += part
        if y >= hi:
            break
        x = y
        k += one
    q[row, Q_COUNTER_KWH if counter else Q_POWER_KWH] += interval_kwh
    return True


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
def _gap(q, row, length):
    q[row, Q_GAPS] += 1.0
    q[row, Q_LONGEST_GAP_S] = max(q[row, Q_LONGEST_GAP_S], length)
