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

Runs. Consecutive whole intervals inside the window and inside one state whose counter delta
is plain (both readings finite, no wrap, reset, jump or gap) need no weights: such a run takes
the counter difference e_r - e_i over the run, exactly the meter's own figure, without
summing per-interval roundings. This is also the fast path: the check of a run reads t and e
only and vectorises (``_counter_run``).

The kernel is O(samples in the window + state changes in it): the first interval is found by
binary search and the state timeline is walked with a pointer that only moves forward.
``compute_job`` validates inputs and wraps the result; ``compute_jobs`` / ``energy_batch`` do
the same for many windows of one machine at once (a replay), with ``job_energy_batch`` and its
``prange`` twin, bit-identical to ``job_energy`` per window; ``warm_up`` compiles (or loads
from cache) the kernels so that no poll ever waits for the compiler.
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
    t, e, p = _samples(t, e, p, np.float64, np.float64)
    st_t, st_s = _timeline(st_t, st_s)
    t0, t1 = _number("t0", t0), _number("t1", t1)
    if t1 < t0:
        raise ValueError(f"job window ends before it starts: t0={t0!r} > t1={t1!r}")
    limits = _limits(max_gap_s, rollover_kwh, max_power_w)
    return _summary(*job_energy(t, e, p, st_t, st_s, t0, t1, *limits))


def compute_jobs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh=0.0, max_power_w=0.0, *,
                 parallel=False) -> list[JobEnergy]:
    """``compute_job`` for many windows [t0[k], t1[k]] over one machine's samples (a replay).

    Element k equals ``compute_job`` of window k exactly, also with e or p passed as float32
    (kept as float32 here, fewer bytes to read; the agent's float64 holds the same values when
    the meter delivers float32). ``parallel`` runs ``job_energy_batch_parallel`` on numba's
    threads; the result is the same.
    """
    kwh, est, q = energy_batch(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w,
                               parallel=parallel)
    return [_summary(kwh[k], est[k], q[k]) for k in range(len(q))]


def energy_batch(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh=0.0, max_power_w=0.0, *,
                 parallel=False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate, run the batch kernel; (kwh[jobs, N_STATES], est[jobs, N_STATES], q[jobs, NQ])."""
    t, e, p = _samples(t, e, p, _lean(e), _lean(p))
    st_t, st_s = _timeline(st_t, st_s)
    t0, t1 = _column("t0", t0, np.float64), _column("t1", t1, np.float64)
    if len(t0) != len(t1):
        raise ValueError(f"t0 and t1 (job windows) must have the same length, got {len(t0)}, {len(t1)}")
    if not (np.all(np.isfinite(t0)) and np.all(np.isfinite(t1))):
        raise ValueError("t0 and t1 (job windows) must be finite")
    if np.any(t1 < t0):
        k = int(np.argmax(t1 < t0))
        raise ValueError(f"job window {k} ends before it starts: t0={t0[k]!r} > t1={t1[k]!r}")
    limits = _limits(max_gap_s, rollover_kwh, max_power_w)
    kwh, est, q = np.zeros((len(t0), N_STATES)), np.zeros((len(t0), N_STATES)), np.zeros((len(t0), NQ))
    if parallel:
        chunks = batch_chunks(t, t0, t1, numba.get_num_threads())
        job_energy_batch_parallel(t, e, p, st_t, st_s, t0, t1, *limits, kwh, est, q, chunks)
    else:
        job_energy_batch(t, e, p, st_t, st_s, t0, t1, *limits, kwh, est, q)
    return kwh, est, q


def batch_chunks(t: np.ndarray, t0: np.ndarray, t1: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries splitting the jobs into ``parts`` contiguous ranges of about equal samples."""
    work = np.searchsorted(t, t1, "right") - np.searchsorted(t, t0, "left") + 1  # + 1: a search
    edges = np.searchsorted(np.cumsum(work), np.linspace(0, work.sum(), parts + 1)[1:-1], "left")
    return np.concatenate(([0], edges, [len(t0)])).astype(np.int64)


def _lean(x) -> type:
    """float32 stays float32 (converts to float64 exactly in the kernel); anything else float64."""
    return np.float32 if getattr(x, "dtype", None) == np.float32 else np.float64


def _samples(t, e, p, e_dtype, p_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, e, p = _column("t", t, np.float64), _column("e", e, e_dtype), _column("p", p, p_dtype)
    if not len(t) == len(e) == len(p):
        raise ValueError(f"t, e and p must have the same length, got {len(t)}, {len(e)}, {len(p)}")
    if not np.all(np.isfinite(t)):
        raise ValueError("t (sample times) must be finite")
    if len(t) > 1 and not np.all(np.diff(t) > 0):
        k = int(np.argmin(np.diff(t) > 0))
        raise ValueError(f"t (sample times) must be strictly increasing: t[{k}]={t[k]!r}, t[{k + 1}]={t[k + 1]!r}")
    return t, e, p


def _timeline(st_t, st_s) -> tuple[np.ndarray, np.ndarray]:
    st_t = _column("st_t", st_t, np.float64)
    codes = np.asarray(st_s)
    if len(st_t) == 0 or len(st_t) != len(codes):
        raise ValueError(f"st_t and st_s must be non-empty and of the same length, got {len(st_t)}, {len(codes)}")
    if not np.all(np.isfinite(st_t)) or np.any(np.diff(st_t) < 0):
        raise ValueError("st_t (state change times) must be finite and sorted")
    if codes.dtype.kind not in "ui" or codes.min() < 0 or codes.max() >= N_STATES:
        raise ValueError(f"st_s must hold integer state codes in [0, {N_STATES})")
    return st_t, _column("st_s", codes, np.uint8)


def _limits(max_gap_s, rollover_kwh, max_power_w) -> tuple[float, float, float]:
    return (_number("max_gap_s", max_gap_s, 0.0), _number("rollover_kwh", rollover_kwh, 0.0),
            _number("max_power_w", max_power_w, 0.0))


def _summary(kwh: np.ndarray, est: np.ndarray, q: np.ndarray) -> JobEnergy:
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
    """Compile (or load from cache) every kernel for the types ``compute_job`` and
    ``compute_jobs`` pass: float64 samples, and float32 e and p (all four combinations)."""
    t = np.array([0.0, 1.0, 2.0])
    st_t, st_s = t[:1].copy(), np.zeros(1, np.uint8)
    job_energy(t, t.copy(), t.copy(), st_t, st_s, 0.5, 1.5, 5.0, 0.0, 0.0)
    t0, t1 = np.array([0.5]), np.array([1.5])
    for e in (t.copy(), t.astype(np.float32)):
        for p in (t.copy(), t.astype(np.float32)):
            for parallel in (False, True):
                energy_batch(t, e, p, st_t, st_s, t0, t1, 5.0, parallel=parallel)
