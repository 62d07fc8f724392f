"""Batch kernel for replays: the same results as the agent's per-job ``compute_job``, exactly.

A replay recomputes many jobs over one long sample array and compares them with the ledger,
so equality here is exact (``==`` on every float), never approximate. The data are random
with every fault the kernel handles: gaps, NaN readings, counter resets, rollovers, jumps,
state changes between and on samples, jobs back to back and apart, windows outside the data.
The fast path (runs of whole counter intervals) is checked against an interval-by-interval
reference of the documented method, within rounding.
"""

import math

import numba
import numpy as np
import pytest

from energy_agent.core.states import N_STATES
from energy_agent.domain import energy
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
    compute_job,
    compute_jobs,
    energy_batch,
)

WS = 1.0 / 3.6e6
ROLLOVER_KWH = 65536.0  # a register wrapping at 2**16 kWh
MAX_POWER_W = 50000.0


def plant(seed, n=6000, *, faults=True):
    """Samples, state timeline and job windows of one machine; power and e are float32 values.

    Power is float32 (what most meter profiles decode), so a float32 column holds it exactly;
    the counter is a float32 kWh register near 12 346 kWh (steps of ~1 Wh), also exact.
    """
    rng = np.random.default_rng(seed)
    t = 1000.0 + np.cumsum(rng.uniform(0.7, 1.3, n))
    if faults:  # a few long gaps (missing samples)
        for k in rng.choice(n, 6, replace=False):
            t[k:] += rng.uniform(5.0, 40.0)
    st_t = np.sort(rng.uniform(t[0] - 20.0, t[-1] + 5.0, n // 40))
    on = rng.choice(n, n // 80, replace=False)
    st_t = np.unique(np.concatenate([st_t, t[on]]))  # some changes exactly on samples
    st_s = rng.integers(0, N_STATES, st_t.size).astype(np.uint8)
    p = np.float32(rng.uniform(0.0, 9000.0, n)).astype(np.float64)
    e = 12345.6 + np.concatenate(([0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(t)))) * WS
    if faults:
        e[rng.choice(n, 15, replace=False)] = np.nan
        p[rng.choice(n, 15, replace=False)] = np.nan
        e[n // 3:] -= 12000.0  # a counter reset to near 346 kWh
        k = n // 2
        e[k:] += 5.0  # an implausible jump: 5 kWh in about a second against 50 kW
        k = 2 * n // 3  # a wrap by ~0.01 kWh (float32 values), after a jump to the top
        e[k:] += 2.0**-9 - e[k]
        e[k - 1] = ROLLOVER_KWH - 2.0**-7
        e[k + 40:k + 90] = np.nan  # counter missing: power fallback
        p[k + 60:k + 70] = np.nan  # and both missing: gaps
    e = np.float32(e).astype(np.float64)
    # Jobs: back to back (shared boundary), apart, on samples, zero length, before and after data.
    cuts = np.sort(rng.uniform(t[0], t[-1], 60))
    t0, t1 = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        t0.append(a)
        t1.append(b if rng.random() < 0.6 else a + (b - a) * rng.random())
    t0 += [t[0] - 50.0, t[-1] - 30.0, t[100], t[200], t[-1] + 1.0, t[10] - 0.25, t[5] - 0.1]
    t1 += [t[0] + 80.0, t[-1] + 60.0, t[300], t[200], t[-1] + 9.0, t[10] - 0.25, t[-5] + 0.1]
    return t, e, p, st_t, st_s, np.array(t0), np.array(t1)


def agent_view(t, e, p, st_t, st_s, t0, t1):
    """What the agent's buffers hold when it computes the job: from the last sample at or
    before t0 to the first at or after t1, and the state changes from the one in force then."""
    lo = max(int(np.searchsorted(t, t0, "right")) - 1, 0)
    hi = int(np.searchsorted(t, t1, "left")) + 1
    k = max(int(np.searchsorted(st_t, t[lo] if len(t) else t0, "right")) - 1, 0)
    return t[lo:hi], e[lo:hi], p[lo:hi], st_t[k:], st_s[k:]


@pytest.fixture(scope="module", params=[1, 2, 3])
def data(request):
    return plant(request.param)


def args(d):
    t, e, p, st_t, st_s, t0, t1 = d
    return t, e, p, st_t, st_s, t0, t1, 5.0, ROLLOVER_KWH, MAX_POWER_W


def test_the_data_has_every_fault(data):
    # Otherwise the equality tests below would not cover the slow paths.
    _, _, q = energy_batch(*args(data))
    for col in (Q_GAPS, Q_RESETS, Q_ROLLOVERS, Q_JUMPS, Q_POWER_KWH):
        assert q[:, col].sum() > 0, col


def test_batch_rows_equal_compute_job_exactly(data):
    t, e, p, st_t, st_s, t0, t1 = data
    batch = compute_jobs(*args(data))
    for k in range(len(t0)):
        whole = compute_job(t, e, p, st_t, st_s, t0[k], t1[k], 5.0, ROLLOVER_KWH, MAX_POWER_W)
        assert batch[k] == whole, k
        if t[0] < t0[k] and t1[k] < t[-1]:  # the agent's trimmed buffers give the same record
            agent = compute_job(*agent_view(t, e, p, st_t, st_s, t0[k], t1[k]), t0[k], t1[k], 5.0,
                                ROLLOVER_KWH, MAX_POWER_W)
            assert agent == whole, k


def test_kernel_arrays_equal_job_energy_exactly(data):
    t, e, p, st_t, st_s, t0, t1 = data
    kwh, est, q = energy_batch(*args(data))
    for k in range(len(t0)):
        one = energy.job_energy(t, e, p, st_t, st_s, t0[k], t1[k], 5.0, ROLLOVER_KWH, MAX_POWER_W)
        for got, want in zip((kwh[k], est[k], q[k]), one):
            assert np.array_equal(got, want), k


def test_parallel_equals_one_thread_exactly(data):
    one = energy_batch(*args(data))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(max(2, min(threads, numba.config.NUMBA_NUM_THREADS)))
        par = energy_batch(*args(data), parallel=True)
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(one, par):
        assert np.array_equal(a, b)


def test_float32_columns_equal_float64_exactly(data):
    # Exact because every value of e and p is a float32 value (see ``plant``).
    t, e, p, st_t, st_s, t0, t1 = data
    lean = compute_jobs(t, e.astype(np.float32), p.astype(np.float32), st_t, st_s, t0, t1, 5.0,
                        ROLLOVER_KWH, MAX_POWER_W)
    assert lean == compute_jobs(*args(data))


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_any_split_of_the_jobs_over_threads_gives_the_same_rows(data, parts):
    # Each job is computed whole by one thread: the rows do not depend on how the jobs are cut.
    from energy_agent.domain import kernels

    t, e, p, st_t, st_s, t0, t1 = data
    one = energy_batch(*args(data))
    out = [np.zeros((len(t0), N_STATES)), np.zeros((len(t0), N_STATES)), np.zeros((len(t0), NQ))]
    kernels.job_energy_batch_parallel(t, e, p, st_t, st_s, t0, t1, 5.0, ROLLOVER_KWH, MAX_POWER_W, *out,
                                      energy.batch_chunks(t, t0, t1, parts))
    for a, b in zip(one, out):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 200])
def test_chunks_cover_every_job_once(data, chunks):
    t, _, _, _, _, t0, t1 = data
    c = energy.batch_chunks(t, t0, t1, chunks)
    assert c[0] == 0 and c[-1] == len(t0) and np.all(np.diff(c) >= 0) and len(c) == chunks + 1


# ------------------------------------------------------------------ the fast path's method


def reference(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w):
    """The documented method interval by interval (plain Python), without runs: every interval
    is classified and its energy allocated by the power-model weights."""
    kwh, q = np.zeros(N_STATES), np.zeros(NQ)
    q[Q_WINDOW_S] = t1 - t0
    fin = math.isfinite
    if t1 <= t0:
        return kwh, q
    if t1 <= t[0] or t0 >= t[-1]:
        q[Q_GAPS], q[Q_LONGEST_GAP_S] = 1, t1 - t0
        return kwh, q
    complete = t[0] <= t0 and t1 <= t[-1]
    for edge in (t[0] - t0, t1 - t[-1]):
        if edge > 0:
            q[Q_GAPS] += 1
            q[Q_LONGEST_GAP_S] = max(q[Q_LONGEST_GAP_S], edge)

    def state(x):
        return st_s[max(int(np.searchsorted(st_t, x, "right")) - 1, 0)]

    for i in range(len(t) - 1):
        a, b = t[i], t[i + 1]
        lo, hi = max(a, t0), min(b, t1)
        if hi <= lo:
            continue
        dt = b - a
        cuts = [lo] + [x for x in st_t if lo < x < hi] + [hi]
        inner = [x for x in st_t if a < x <= b]
        s_a, s_b = state(a), state(b)
        lead_end = next((x for x in inner if x < b and state(x) != s_a), b)
        trail_start = a if s_a == s_b else b
        for x in inner:
            if x < b:
                trail_start = b if state(x) != s_b else (x if trail_start == b else trail_start)
        step = not (lead_end == b and s_a == s_b)
        pa, pb = p[i], p[i + 1]
        powered = fin(pa) and fin(pb)
        pa, pb = (max(pa, 0.0), max(pb, 0.0)) if powered else (1.0, 1.0)

        def model(x, y, pa=pa, pb=pb, step=step):
            if step:
                pm = 0.5 * (pa + pb)
                return (pa * max(0.0, min(y, lead_end) - x) + pm * max(0.0, min(y, trail_start) - max(x, lead_end))
                        + pb * max(0.0, y - max(x, trail_start)))
            return 0.5 * (y - x) * (2 * pa + (pb - pa) / dt * ((x - a) + (y - a)))

        counter = False
        if fin(e[i]) and fin(e[i + 1]):
            delta = e[i + 1] - e[i]
            limit = 1.5 * max_power_w / 3.6e6 * dt
            if delta < 0:
                delta += rollover_kwh
                ok = delta <= limit if max_power_w > 0 else delta <= 0.01 * rollover_kwh
                counter = rollover_kwh > 0 and delta >= 0 and ok
                q[Q_ROLLOVERS if counter else Q_RESETS] += 1
            elif max_power_w > 0 and delta > limit:
                q[Q_JUMPS] += 1
            else:
                counter = True
        if counter:
            total = model(a, b)
            if not (powered and total > 0):
                step, pa, pb, total = False, 1.0, 1.0, dt
            scale = delta / total
            q[Q_COUNTER_S] += hi - lo
            if dt > max_gap_s:
                q[Q_GAPS] += 1
                q[Q_LONGEST_GAP_S] = max(q[Q_LONGEST_GAP_S], dt)
        elif powered and dt <= max_gap_s:
            scale = WS
            q[Q_POWER_S] += hi - lo
        else:
            q[Q_GAPS] += 1
            q[Q_LONGEST_GAP_S] = max(q[Q_LONGEST_GAP_S], dt)
            complete = False
            continue
        q[Q_COVERED_S] += hi - lo
        for x, y in zip(cuts[:-1], cuts[1:]):
            part = scale * model(x, y, pa, pb, step)
            kwh[state(x)] += part
            q[Q_COUNTER_KWH if counter else Q_POWER_KWH] += part
    if complete:
        q[Q_COVERED_S] = t1 - t0
    return kwh, q


def test_runs_follow_the_interval_by_interval_method(data):
    t, e, p, st_t, st_s, t0, t1 = data
    kwh, _, q = energy_batch(*args(data))
    counts = [Q_GAPS, Q_RESETS, Q_ROLLOVERS, Q_JUMPS]
    for k in range(len(t0)):
        ref_kwh, ref_q = reference(t, e, p, st_t, st_s, t0[k], t1[k], 5.0, ROLLOVER_KWH, MAX_POWER_W)
        assert np.array_equal(q[k, counts], ref_q[counts]), k
        assert q[k, Q_LONGEST_GAP_S] == ref_q[Q_LONGEST_GAP_S]
        # A run takes e_r - e_i where the reference adds per-interval parts, each rounded to
        # ~1e-16 of the ~1.2e4 kWh readings: 1e-9 kWh bounds thousands of such roundings.
        assert np.allclose(kwh[k], ref_kwh, rtol=0, atol=1e-9), k
        seconds = [Q_COVERED_S, Q_COUNTER_S, Q_POWER_S, Q_COUNTER_KWH, Q_POWER_KWH]
        assert np.allclose(q[k, seconds], ref_q[seconds], rtol=0, atol=1e-9), k


def test_back_to_back_jobs_add_up_to_the_counter_difference():
    # No faults: jobs tiling the data must together take exactly the counter's difference
    # (up to float64 rounding of ~60 job sums near 1e4 kWh: 1e-10 kWh).
    t, e, p, st_t, st_s, _, _ = plant(4, faults=False)
    cuts = np.linspace(t[0], t[-1], 61)
    kwh, _, q = energy_batch(t, e, p, st_t, st_s, cuts[:-1], cuts[1:], 5.0, ROLLOVER_KWH, MAX_POWER_W)
    assert kwh.sum() == pytest.approx(e[-1] - e[0], rel=0, abs=1e-10)
    assert q[:, Q_POWER_KWH].sum() == 0.0 and q[:, Q_GAPS].sum() == 0.0


def test_windows_in_any_order_equal_job_energy_exactly(data):
    # The batch starts each window's search where the last one ended: any order must give the
    # same rows (searches forward, backward, from beyond the data).
    t, e, p, st_t, st_s, t0, t1 = data
    order = np.random.default_rng(5).permutation(len(t0))
    kwh, est, q = energy_batch(t, e, p, st_t, st_s, t0[order], t1[order], 5.0, ROLLOVER_KWH, MAX_POWER_W)
    for row, k in enumerate(order):
        one = energy.job_energy(t, e, p, st_t, st_s, t0[k], t1[k], 5.0, ROLLOVER_KWH, MAX_POWER_W)
        for got, want in zip((kwh[row], est[row], q[row]), one):
            assert np.array_equal(got, want), k


def test_galloping_search_equals_searchsorted():
    # The batch's search from a hint must find what a binary search finds, whatever the hint,
    # with repeated values (state changes at the same time) and values outside the array.
    from energy_agent.domain import kernels

    rng = np.random.default_rng(11)
    for size in (1, 2, 3, 17, 1000):
        a = np.sort(rng.integers(0, size, size).astype(np.float64))
        for x in np.concatenate((a, a + 0.5, [-1.0, size + 1.0, np.nan])):
            want = max(int(np.searchsorted(a, x, side="right")) - 1, 0)
            for h in {0, size // 2, size - 1, size + 5}:
                assert kernels._last_at_or_before(a, x, np.uintp(h)) == want, (size, x, h)


def test_infinite_counter_readings_are_never_energy_without_a_power_limit():
    # With max_power_w = 0 the jump limit is infinite: only the finiteness of the readings
    # keeps an infinite counter value out of a run (the block check caps the limit for it).
    t, e, p, st_t, st_s, t0, t1 = plant(5, n=3000, faults=False)
    e = e.copy()
    e[[700, 701, 1500]] = np.inf
    t0 = np.append(t0, [t[1200], t[600]])  # windows ending on them: a run would end there
    t1 = np.append(t1, [t[1500], t[700]])
    kwh, _, q = energy_batch(t, e, p, st_t, st_s, t0, t1, 5.0, ROLLOVER_KWH, 0.0)
    assert np.all(np.isfinite(kwh)) and np.all(np.isfinite(q))
    assert q[:, Q_POWER_KWH].sum() > 0.0  # the intervals next to them fell back to power
    for k in range(len(t0)):
        ref_kwh, ref_q = reference(t, e, p, st_t, st_s, t0[k], t1[k], 5.0, ROLLOVER_KWH, 0.0)
        # As in test_runs_follow_the_interval_by_interval_method: 1e-9 kWh bounds the
        # roundings of per-interval parts of ~1.2e4 kWh readings that runs do not make.
        assert np.allclose(kwh[k], ref_kwh, rtol=0, atol=1e-9), k
        assert np.allclose(q[k, [Q_COUNTER_KWH, Q_POWER_KWH]], ref_q[[Q_COUNTER_KWH, Q_POWER_KWH]], rtol=0,
                           atol=1e-9), k


def test_invalid_windows_are_named():
    t, e, p, st_t, st_s, t0, t1 = plant(1, n=400)
    with pytest.raises(ValueError, match="job window 1 ends before it starts"):
        energy_batch(t, e, p, st_t, st_s, [t[5], t[9]], [t[8], t[7]], 5.0)
    with pytest.raises(ValueError, match="t0 and t1 .* same length"):
        energy_batch(t, e, p, st_t, st_s, [t[5]], [t[8], t[9]], 5.0)
    with pytest.raises(ValueError, match="t0 and t1 .* finite"):
        energy_batch(t, e, p, st_t, st_s, [np.nan], [t[8]], 5.0)


def test_warm_up_compiles_the_batch_kernels():
    energy.warm_up_batch()
    before = [list(f.signatures) for f in (energy.job_energy_batch, energy.job_energy_batch_parallel)]
    t, e, p, st_t, st_s, t0, t1 = plant(2, n=400)
    for col in ((e, p), (e.astype(np.float32), p.astype(np.float32))):
        for parallel in (False, True):
            compute_jobs(t, *col, list(st_t), list(st_s), list(t0), list(t1), 5, parallel=parallel)
    assert [list(f.signatures) for f in (energy.job_energy_batch, energy.job_energy_batch_parallel)] == before


def test_kernels_use_only_numbas_public_api():
    # No LLVM IR, numba internals or private options (an upgrade of numba must not break them).
    import ast
    from pathlib import Path

    from energy_agent.domain import kernels

    source = Path(kernels.__file__).read_text()
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    assert not {m for m in modules if m.startswith(("llvmlite", "numba."))}, modules
    assert "_nrt" not in source and "intrinsic" not in source
