"""The numba kernels behind ``energy_agent.domain.energy`` (method, weights and runs: see its docstring).

``job_energy`` is the per-job kernel the agent runs for every finished job; ``job_energy_batch``
and ``job_energy_batch_parallel`` compute many windows of one machine (a replay) with the same
code (``_window``), bit-identical per window. This module is the only one that imports numba:
the agent itself runs ``job_energy`` compiled ahead of time from this source (``energy_agent.domain.aot``)
when that build is present, so a gateway does not carry LLVM in memory.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

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
# np.isfinite checks. And no 'reassoc', 'contract' or 'arcp' either: with them LLVM may round
# the same source differently where it is inlined into another loop, and the batch kernels
# must give results bit-identical to ``job_energy`` so that a replay can compare with the
# ledger exactly. The fast path needs none of them (see ``_counter_run``).
FASTMATH: set[str] = set()
# The helpers below never allocate, so they run without numba's reference counting: with it,
# each call passing arrays costs atomic increments and decrements of their counts, once per
# run in the loop over runs, and with two threads on the same arrays those atomics contend.
_inner = numba.njit(cache=True, fastmath=FASTMATH, _nrt=False)
_KWH_PER_WS = 1.0 / 3.6e6
_f64 = np.float64  # every e and p read is widened first: float32 columns compute in float64
_BLOCK = 64  # intervals checked per step of a counter run: a fixed-length loop LLVM vectorises
# Pieces of work per range of ``job_energy_batch_parallel``: 64 in all on two threads, so the
# thread that finishes first waits for at most one piece, ~1/64 of the batch, where 8 per
# range left it waiting for up to 1/16 (measured: 0.85 against 0.83 of the two-thread limit,
# median of 25 pairs). Starting a piece costs one galloping search from index 0. (numba's
# ``parallel_chunksize`` would not do: the OpenMP layer hands out a prange's chunks statically.)
_PIECES = 32
_MAX = float(np.finfo(np.float64).max)
# Samples ahead of a counter run's block at which t and e are prefetched. The block check
# (~200 instructions per block) leaves room in the out-of-order window for a block or two
# only: too few cache misses in flight to stream at the memory's rate. Prefetching ~0.9 KB of
# each ahead gives the memory system enough requests (measured: 64 to 256 samples; 112 was
# 0.03 above 128 in each of three interleaved runs with one thread and equal with two, and
# past 128 the rate falls steeply; the streaming reference, whose loop is short, gets no
# faster from prefetching).
_AHEAD = 112
# Where runs have been ending (``_window``'s split hint): bit set when the last run cut by a
# state change (CHANGE), or by a window's end (END), stopped inside an interval rather than on
# a sample. Kept apart because they differ in practice: OPC UA state changes fall between the
# meter's samples while windows may start and end on them, or the other way round. Carried
# from window to window of a batch, so that a window's first runs are predicted too.
_SPLIT_NONE, _SPLIT_CHANGE, _SPLIT_END = np.uint8(0), np.uint8(1), np.uint8(2)


@intrinsic
def _prefetch(typingctx, a, k):
    """Ask the CPU to start loading the cache line of a[k] (``llvm.prefetch``): a hint with no
    effect on any result and never a fault, so k may be past the end of a."""
    def codegen(context, builder, sig, args):
        ptr = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        ptr = builder.bitcast(ptr, i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(a, k), codegen


@intrinsic
def _take(typingctx, counter):
    """counter[0] += 1 as one atomic instruction; returns the value before: the next unit of
    work for whichever thread asks first (no ordering with other memory is needed)."""
    def codegen(context, builder, sig, args):
        ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", ptr, ir.IntType(64)(1), "monotonic")

    return types.int64(counter), codegen


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


@_inner
def _gap(q, row, length):
    q[row, Q_GAPS] += 1.0
    q[row, Q_LONGEST_GAP_S] = max(q[row, Q_LONGEST_GAP_S], length)


@numba.njit(cache=True, fastmath=FASTMATH)
def _plain_counter(ta, tb, ea, eb, klim, max_gap_s):
    """Interval whose counter delta is measured energy with nothing to count: both readings
    finite (``ea`` is known to be), no wrap, no reset, no jump, no gap. Branch-free (``&``)."""
    dt = tb - ta
    d = eb - ea
    return (abs(eb) < math.inf) & (d >= 0.0) & (d <= klim * dt) & (dt <= max_gap_s)


@_inner
def _suspect(t, e, y, klim, max_gap_s):
    """Whether interval y may not be plain: ``not _plain_counter`` in a form that vectorises
    with fewer instructions. Stricter, never looser: the jump limit is capped at the largest
    finite float, which fails an infinite reading or difference with one min instead of an abs
    and a compare, and NaN fails every compare. Where the two differ (an overflowing
    difference of finite readings) the run steps with ``_plain_counter`` and goes on."""
    one = np.uintp(1)
    dt = t[y + one] - t[y]
    d = _f64(e[y + one]) - _f64(e[y])
    lim = klim * dt
    lim = _MAX if _MAX < lim else lim
    return (not dt <= max_gap_s) | (not d >= 0.0) | (not d <= lim)


@_inner
def _block_bad(t, e, x, klim, max_gap_s):
    """Whether any of the ``_BLOCK`` intervals from x is ``_suspect``: a fixed-length loop
    without an early exit, so that LLVM vectorises it (4 intervals per AVX2 instruction)."""
    bad = False
    for k in range(_BLOCK):
        bad |= _suspect(t, e, x + np.uintp(k), klim, max_gap_s)
    return bad


@_inner
def _block_tail(t, e, x, end, klim, max_gap_s):
    """(s, bad) for the ``_BLOCK`` intervals from x of which only those ending by ``end``
    count: s = x + their number (t increases, so they come first), bad = whether one of them
    is ``_suspect``. One branch-free pass that vectorises like ``_block_bad``."""
    one = np.uintp(1)
    s = x
    bad = False
    for k in range(_BLOCK):
        y = x + np.uintp(k)
        inside = t[y + one] <= end
        s += np.uintp(inside)
        bad |= inside & _suspect(t, e, y, klim, max_gap_s)
    return s, bad


@_inner
def _counter_run(t, e, i, n, end, klim, max_gap_s):
    """Last index r >= i such that every interval of [t_i, t_r] is a plain counter interval
    (``_plain_counter``) and t_r <= end (t1, or the next state change if that is earlier).

    The common case of a replay: such a run is one state, whole, and its energy is the
    counter difference e_r - e_i. An interval that ends exactly on a state change belongs to
    the run: the change takes effect at its end, so all of it is in the run's state (the
    general path would give it all too, as delta / total * total). Whole blocks of ``_BLOCK``
    intervals are checked while the block ends by ``end``, then one more block masked by
    t <= end (no search, no serial tail). This reads t and e only (16 bytes per sample); only
    a failed check steps interval by interval.
    """
    one = np.uintp(1)
    block = np.uintp(_BLOCK)
    r = i
    while r + block < n and t[r + block] <= end:
        for k in range(0, _BLOCK, 8):  # 8 float64 per 64-byte line; past the end is harmless
            _prefetch(t, r + np.uintp(_AHEAD + k))
            _prefetch(e, r + np.uintp(_AHEAD + k))
        if _block_bad(t, e, r, klim, max_gap_s):
            break
        r += block
    # The rest: fewer than a block by ``end``, or a block with a suspect interval.
    if r + block < n:
        s, bad = _block_tail(t, e, r, end, klim, max_gap_s)
    else:  # the last samples of the data: no full block to read
        s = r
        while s + one < n and t[s + one] <= end:
            s += one
        bad = False
        for x in range(r, s):
            bad |= not _plain_counter(t[x], t[x + one], _f64(e[x]), _f64(e[x + one]), klim, max_gap_s)
    if not bad:
        return s
    while r < s and _plain_counter(t[r], t[r + one], _f64(e[r]), _f64(e[r + one]), klim, max_gap_s):
        r += one
    return r


@_inner
def _last_at_or_before(a, x, h):
    """max(searchsorted(a, x, side="right") - 1, 0) for sorted a: galloping from index h, so
    that a batch of windows in time order finds each start in a few steps near the last end
    (a binary search over all of t would miss the cache at most of its ~27 steps)."""
    one = np.uintp(1)
    n = np.uintp(a.size)
    if not x == x:  # NaN: numpy's order, in which NaN is last
        return np.uintp(max(np.searchsorted(a, x, side="right") - 1, 0))
    if a[0] > x:
        return np.uintp(0)
    h = min(h, n - one)
    step = one
    if a[h] <= x:  # a[lo] <= x < a[hi], a[n] taken as +inf
        lo = h
        hi = n
        while lo + step < n:
            if a[lo + step] > x:
                hi = lo + step
                break
            lo += step
            step += step
    else:
        hi = h
        while True:
            lo = hi - step if hi > step else np.uintp(0)
            if a[lo] <= x:
                break
            hi = lo
            step += step
    while hi - lo > one:
        mid = lo + ((hi - lo) >> one)
        if a[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


@numba.njit(cache=True, fastmath=FASTMATH)
def job_energy(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w):
    """Energy by state of window [t0, t1]: (kwh[N_STATES], est_kwh[N_STATES], q[NQ]).

    Inputs must be valid (see ``compute_job``): t strictly increasing, st_t sorted and
    non-empty, st_s < N_STATES.
    """
    kwh = np.zeros((1, N_STATES))
    est = np.zeros((1, N_STATES))
    q = np.zeros((1, NQ))
    _window(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, 0,
            np.uintp(0), np.uintp(0), _SPLIT_NONE)
    return kwh[0], est[0], q[0]


@_inner
def _window(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, row, hint_i, hint_j,
            split):
    """``job_energy`` into the zeroed rows ``row`` of kwh, est and q: one code path for one job
    and for a batch (rows by index, not as views: a view costs two atomic reference counts).

    hint_i, hint_j: where to start looking for the first sample and state (any index gives the
    same result); split: the bits ``_SPLIT_CHANGE`` and ``_SPLIT_END``, whether the last run that
    ended at a state change, or at a window's end, ended inside an interval (see
    ``_prefetch_run_end``; only a hint, no effect on any result). Returns the sample and state
    indices where the window ended and split as it stands then: the hints for a next window in
    time order.
    """
    q[row, Q_WINDOW_S] = t1 - t0
    one = np.uintp(1)
    n = np.uintp(t.size)
    m = np.uintp(st_t.size)
    if t1 <= t0:
        return hint_i, hint_j, split
    if n < 2 or t1 <= t[0] or t0 >= t[n - one]:
        _gap(q, row, t1 - t0)
        return hint_i, hint_j, split
    complete = True  # no part of the window uncovered
    if t0 < t[0]:
        _gap(q, row, t[0] - t0)
        complete = False
    if t1 > t[n - one]:
        _gap(q, row, t1 - t[n - one])
        complete = False
    klim = 1.5 * max_power_w / 3.6e6 if max_power_w > 0.0 else math.inf  # the jump test as one compare
    per_s = (n - one) / (t[n - one] - t[0])  # mean samples per second: where a run may end
    i = _last_at_or_before(t, t0, hint_i)
    j = _last_at_or_before(st_t, t[i], hint_j)
    while i + one < n and t[i] < t1:
        a = t[i]
        while j + one < m and st_t[j + one] <= a:
            j += one

        # Fast path: a run of whole plain counter intervals in one state takes the counter
        # difference over the run (exact: no per-interval rounding, no weights needed).
        if a >= t0 and abs(e[i]) < math.inf:
            end = min(t1, st_t[j + one]) if j + one < m else t1
            _prefetch(st_t, j + np.uintp(8))  # the next state changes
            _prefetch(st_s, j + np.uintp(8))
            which = _SPLIT_END if end == t1 else _SPLIT_CHANGE
            if split & which:
                _prefetch_run_end(p, i, n, (end - a) * per_s)
            # An interval that ends past ``end`` (split by a state change or t1) starts no run:
            # straight to the general path (``_counter_run`` would return i after a masked block).
            if t[i + one] <= end:
                r = _counter_run(t, e, i, n, end, klim, max_gap_s)
            else:
                r = i
                split |= which
            if r > i:
                run_kwh = _f64(e[r]) - _f64(e[i])
                run_s = t[r] - a
                kwh[row, st_s[j]] += run_kwh
                q[row, Q_COUNTER_KWH] += run_kwh
                q[row, Q_COUNTER_S] += run_s
                q[row, Q_COVERED_S] += run_s
                if t[r] == end:  # on a sample: no p read there
                    split &= ~which
                i = r
                continue

        if not _interval(t, e, p, st_t, st_s, i, j, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, row):
            complete = False
        i += one
    if complete:  # exactly the window, not a sum of parts that may round below it
        q[row, Q_COVERED_S] = t1 - t0
    return i, j, split


@_inner
def _prefetch_run_end(p, i, n, ahead):
    """Start loading p where a run from i is expected to end, ``ahead`` samples on (at the next
    state change or t1, guessed from the mean sample rate): the interval there is split and
    reads p, and a miss on p would wait for memory. Only a hint, a wrong guess costs a cache
    line. ``_window`` asks for it where the last run cut the same way (by a state change, or by
    a window's end) ended inside an interval: where runs end on samples, p is never read and
    even a prefetch costs, as one more miss queued behind the stream of t and e. Measured on the
    benchmark's data: predicting per window, each window's first runs went without it (0.02 of
    the stream's rate, state changes between samples); predicting from any general interval,
    faults too, prefetched for runs that end on samples (0.04, state changes on samples)."""
    one = np.uintp(1)
    if ahead < n - i:  # also False for NaN
        k = i + np.uintp(ahead)
        _prefetch(p, k - one if k >= one else k)
        _prefetch(p, k + one)


@_inner
def _interval(t, e, p, st_t, st_s, i, j, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, row):
    """Interval [t_i, t_i+1] of the window that is not part of a run, state j at t_i, by the
    general method (classification, power-model weights, split at state changes and t0/t1).
    Returns False when it is uncovered (a gap). Kept out of the run loop: runs are the hot path."""
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


@_inner
def _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q, first, stop):
    i = j = np.uintp(0)
    split = _SPLIT_NONE
    for k in range(first, stop):
        i, j, split = _window(t, e, p, st_t, st_s, t0[k], t1[k], max_gap_s, rollover_kwh, max_power_w,
                              kwh, est, q, k, i, j, split)


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
    """``job_energy_batch`` on numba's threads. The jobs come in the ranges chunks[c]:chunks[c + 1]
    (``batch_chunks``: about equal samples each), each cut into ``_PIECES`` runs of jobs that
    the threads take one at a time as they finish the last (``_take``): a thread slowed by
    other work on its core takes fewer, instead of the others waiting for it at the end. Each
    job is computed by one thread with the same code, so the rows are bit-identical to the
    one-thread kernel's, whatever the split."""
    taken = np.zeros(1, np.int64)
    units = (chunks.size - 1) * _PIECES
    for _ in numba.prange(chunks.size - 1):  # one per thread when there are as many ranges
        u = _take(taken)
        while u < units:
            c, k = u // _PIECES, u % _PIECES
            a, b = chunks[c], chunks[c + 1]
            _jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, kwh, est, q,
                  a + (b - a) * k // _PIECES, a + (b - a) * (k + 1) // _PIECES)
            u = _take(taken)
