"""Batch job-energy kernel throughput, as a share of the memory-bandwidth limit, and against NumPy.

Data: BENCH_SAMPLES (default 1e8) samples of one machine at ~1 Hz with jitter, jobs of about an
hour back to back over all of them, a state change every ~10 minutes, and rare faults (NaN
readings, a counter reset, jumps, gaps) so that the slow paths run too. Job boundaries and
state changes lie on sample times (the common case of a replay: no interval is split), so that
plain NumPy can compute the same result (``numpy_batch``). Layout: t float64, e float64
(counter kWh), p float32 (W), states as a timeline. In a run of plain counter intervals the
kernel reads t and e only: 16 bytes per sample.

1. The limit: numba loops that only read t and e, one thread and ``prange`` on two, each in two
   orders (front to back: 2 streams per thread; both halves of each thread's share at once: 4
   streams, at times a few percent faster on one core). The limit is the faster of the two in
   each round.
2. The kernels: ``job_energy_batch`` (one thread) and ``job_energy_batch_parallel`` (two
   threads), and for information the one-thread kernel with every state change moved 0.3 s
   after its sample, where each change splits an interval (general path, reads p).
3. NumPy: the same result, bit for bit, with array operations in chunks (see ``numpy_batch``).

Timing: BENCH_ROUNDS rounds; in each, every reference and kernel runs once, back to back (the
order reversed every other round), after a short pause (idle OpenMP workers spin for a few
milliseconds after a parallel region and would slow what runs next). A kernel's ratio in a
round is the faster reference's time over the kernel's: calls ~0.1 s apart see the same load
of a shared machine. Printed: the median ratio over rounds with its range, and rates from the
best call of each. Checked, not timed: the batch kernels' rows equal ``job_energy`` of their
windows bit for bit, the two-thread kernel equals the one-thread one, NumPy equals the kernel.
Run: make bench   (or: .venv/bin/python benchmarks/bench_kernel.py)
"""

from __future__ import annotations

import os
import platform
import time

import numba
import numpy as np

from energy_agent.core.states import N_STATES
from energy_agent.domain import energy
from energy_agent.domain.energy import NQ, Q_GAPS, Q_JUMPS, Q_RESETS, Q_ROLLOVERS

N = int(float(os.environ.get("BENCH_SAMPLES", "1e8")))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
NUMPY_ROUNDS = 3
MAX_GAP_S, ROLLOVER_KWH, MAX_POWER_W = 5.0, 0.0, 20000.0
PAUSE_S = 0.1
FLOORS = {1: 0.75, 2: 0.85}  # issue 19: share of the streaming limit with 1 and 2 threads
CHUNK = 1 << 16  # samples per NumPy step: its two temporaries (1 MB) stay in the core's L2 cache
BYTES = 16  # per sample in a counter run: t and e as float64


@numba.njit(cache=True, fastmath=True)
def _stream(t, e, halves):
    """Sum of t + e: front to back (2 streams), or as its two halves at once (4 streams)."""
    acc = 0.0
    if halves:
        h = t.size // 2
        a, b, c, d = t[:h], e[:h], t[h:2 * h], e[h:2 * h]
        for i in range(h):
            acc += a[i] + b[i] + c[i] + d[i]
        t, e = t[2 * h:], e[2 * h:]
    for i in range(t.size):
        acc += t[i] + e[i]
    return acc


@numba.njit(cache=True, fastmath=True)
def stream(t, e, halves):
    return _stream(t, e, halves)


@numba.njit(cache=True, fastmath=True, parallel=True)
def stream_parallel(t, e, halves, k):
    """Each of k threads reads its share of t and e, as ``_stream``."""
    acc = 0.0
    for c in numba.prange(k):
        lo, hi = t.size * c // k, t.size * (c + 1) // k
        acc += _stream(t[lo:hi], e[lo:hi], halves)
    return acc


def make_data(rng):
    t = np.arange(N, dtype=np.float64) + rng.uniform(-0.2, 0.2, N)
    level = np.array([0, 300, 1200, 9000, 1800, 2600], np.float32)
    st_i = np.unique(np.concatenate(([0], rng.integers(1, N - 1, N // 600))))  # changes on samples
    st_s = rng.integers(2, 6, st_i.size).astype(np.uint8)
    state = np.repeat(st_s, np.diff(np.append(st_i, N)))
    p = (level[state] * (1 + 0.02 * rng.standard_normal(N, np.float32))).astype(np.float32)
    e = 1000.0 + np.concatenate(([0.0], np.cumsum(0.5 * (p[1:] + p[:-1].astype(np.float64)) * np.diff(t)))) / 3.6e6
    del state
    for k in rng.integers(1, N - 1, 100):
        e[k] = np.nan  # bad counter readings: power fallback on both sides
    for k in rng.integers(1, N - 1, 20):
        e[k:] += 50.0  # implausible jumps
    for k in rng.integers(1, N - 1, 20):
        t[k:] += 30.0  # gaps (the counter still covers them)
    e[N // 2:] -= e[N // 2] - 1.0  # a counter reset
    job_i = np.unique(np.concatenate(([0], rng.integers(1, N - 1, N // 3600), [N - 1])))  # on samples
    return t, e, p, t[st_i], st_s, t[job_i[:-1]], t[job_i[1:]]


# ------------------------------------------------------------------ NumPy


def numpy_batch(t, e, p, st_t, st_s, t0, t1):
    """The kernel's result with NumPy, for windows in time order that do not overlap and start,
    end and change state on sample times (no interval is split). Returns (kwh, est, q) like
    the batch kernels, q with the count columns only.

    The same decomposition as the kernel: maximal runs of plain counter intervals inside one
    window and one state take e_r - e_i; every other interval is classified on its own. Only
    the plain test touches every sample (two differences, a product, three compares, in
    cache-sized chunks, into preallocated buffers); the rest works on the few intervals that
    fail it and on the runs' ends. Sums are taken in time order (``bincount``), as the kernel
    adds them.
    """
    klim = 1.5 * MAX_POWER_W / 3.6e6 if MAX_POWER_W > 0 else np.inf
    n, jobs = len(t), len(t0)
    first, last = np.searchsorted(t, t0), np.searchsorted(t, t1)  # sample indices of the windows
    change = np.searchsorted(t, st_t)  # sample index of each state change
    dt_buf, d_buf = np.empty(CHUNK), np.empty(CHUNK)
    plain_buf, test_buf = np.empty(CHUNK, bool), np.empty(CHUNK, bool)
    bad = []
    for lo in range(0, n - 1, CHUNK):  # intervals lo .. hi-1
        hi = min(lo + CHUNK, n - 1)
        dt, d, plain, test = dt_buf[:hi - lo], d_buf[:hi - lo], plain_buf[:hi - lo], test_buf[:hi - lo]
        np.subtract(t[lo + 1:hi + 1], t[lo:hi], out=dt)
        np.subtract(e[lo + 1:hi + 1], e[lo:hi], out=d)
        np.less_equal(dt, MAX_GAP_S, out=plain)
        plain &= np.greater_equal(d, 0.0, out=test)  # NaN fails every compare
        plain &= np.less_equal(d, np.multiply(dt, klim, out=dt), out=test)
        if not np.isfinite(klim):  # then only finiteness keeps an infinite reading out
            plain &= np.isfinite(e[lo:hi], out=test)
            plain &= np.isfinite(e[lo + 1:hi + 1], out=test)
        if not plain.all():
            bad.append(lo + np.flatnonzero(~plain))
    bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)

    # Pieces: runs between consecutive cuts (window ends, state changes, failed intervals).
    cuts = np.unique(np.concatenate((first, last, change, bad, bad + 1)))
    start, stop = cuts[:-1], cuts[1:]
    job = np.searchsorted(first, start, "right") - 1
    inside = (job >= 0) & (stop <= last[np.maximum(job, 0)])
    start, stop, job = start[inside], stop[inside], job[inside]
    state = st_s[np.maximum(np.searchsorted(change, start, "right") - 1, 0)]
    single = np.zeros(len(start), bool)  # the piece is one failed interval
    if len(bad):
        single = bad[np.minimum(np.searchsorted(bad, start), len(bad) - 1)] == start

    en = e[stop] - e[start]  # runs: the counter difference
    est = np.zeros(len(start))
    counts = np.zeros((len(start), 4))
    i = start[single]
    en[single], est[single], counts[single] = _intervals(t, e, p, st_t, st_s, i)
    key = job * N_STATES + state
    kwh = np.bincount(key, en, jobs * N_STATES).reshape(jobs, N_STATES)
    est = np.bincount(key, est, jobs * N_STATES).reshape(jobs, N_STATES)
    q = np.zeros((jobs, NQ))
    for col, x in zip((Q_GAPS, Q_RESETS, Q_ROLLOVERS, Q_JUMPS), counts.T):
        q[:, col] = np.bincount(job, x, jobs)
    return kwh, est, q


def _intervals(t, e, p, st_t, st_s, i):
    """(energy, estimated energy, counts gaps/resets/rollovers/jumps) of whole intervals i, one
    state change at most at their end, by the kernel's general method with the same operations."""
    a, b = t[i], t[i + 1]
    dt = b - a
    s_a = st_s[np.maximum(np.searchsorted(st_t, a, "right") - 1, 0)]
    s_b = st_s[np.maximum(np.searchsorted(st_t, b, "right") - 1, 0)]
    step = s_a != s_b  # a change at the end: the interval takes p_i throughout
    pa, pb = p[i].astype(np.float64), p[i + 1].astype(np.float64)
    powered = np.isfinite(pa) & np.isfinite(pb)
    pa, pb = np.where(powered, np.maximum(pa, 0.0), pa), np.where(powered, np.maximum(pb, 0.0), pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        model = np.where(step, pa * dt + 0.0 + 0.0, 0.5 * dt * (2.0 * pa + (pb - pa) / dt * (0.0 + dt)))
        delta = e[i + 1] - e[i]
        finite = np.isfinite(e[i]) & np.isfinite(e[i + 1])
        limit = 1.5 * MAX_POWER_W / 3.6e6 * dt
        wrapped = delta + ROLLOVER_KWH
        plausible = wrapped <= limit if MAX_POWER_W > 0 else wrapped <= 0.01 * ROLLOVER_KWH
        rollover = finite & (delta < 0) & (ROLLOVER_KWH > 0) & (wrapped >= 0) & plausible
        reset = finite & (delta < 0) & ~rollover
        jump = finite & (delta >= 0) & (MAX_POWER_W > 0) & (delta > limit)
        counter = finite & ~reset & ~jump
        delta = np.where(rollover, wrapped, delta)
        total = np.where(powered, model, 0.0)
        total = np.where(total > 0, total, dt)  # else time weights: the model is then dt
        by_counter = delta / total * total
        by_power = 1.0 / 3.6e6 * model
        power = ~counter & powered & (dt <= MAX_GAP_S)
    gap = (counter & (dt > MAX_GAP_S)) | (~counter & ~power)
    en = np.where(counter, by_counter, np.where(power, by_power, 0.0))
    return en, np.where(power, by_power, 0.0), np.stack((gap, reset, rollover, jump), axis=1)


# ------------------------------------------------------------------ checks and timing


def check(t, e, p, st_t, st_s, t0, t1, limits, out, par):
    """Rows equal ``job_energy`` of their windows (every 50th, with the agent's trimmed
    buffers and float64 p) and the two-thread kernel equals the one-thread kernel, bit for bit."""
    assert all(np.array_equal(a, b) for a, b in zip(out, par)), "two threads differ from one"
    for k in range(0, len(t0), 50):
        lo = max(int(np.searchsorted(t, t0[k], "right")) - 1, 0)
        hi = int(np.searchsorted(t, t1[k], "left")) + 1
        s = max(int(np.searchsorted(st_t, t[lo], "right")) - 1, 0)
        one = energy.job_energy(t[lo:hi], e[lo:hi], p[lo:hi].astype(np.float64), st_t[s:], st_s[s:], t0[k], t1[k],
                                *limits)
        for got, want in zip((out[0][k], out[1][k], out[2][k]), one):
            assert np.array_equal(got, want), f"row {k} differs from job_energy"


def timed(fns, rounds):
    """Seconds per call of each function, in rounds (see the module docstring)."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            time.sleep(PAUSE_S)
            s = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - s)
    return {name: np.array(v) for name, v in times.items()}


def main() -> None:
    t, e, p, st_t, st_s, t0, t1 = make_data(np.random.default_rng(7))
    jobs = len(t0)
    limits = (MAX_GAP_S, ROLLOVER_KWH, MAX_POWER_W)
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    chunks = energy.batch_chunks(t, t0, t1, threads)
    st_between = st_t + 0.3  # each change 0.3 s after its sample: it splits an interval
    out = [np.zeros((jobs, N_STATES)), np.zeros((jobs, N_STATES)), np.zeros((jobs, NQ))]

    def kernel(parallel=False, changes=st_t):
        def run():
            for a in out:
                a[:] = 0.0
            if parallel:
                energy.job_energy_batch_parallel(t, e, p, changes, st_s, t0, t1, *limits, *out, chunks)
            else:
                energy.job_energy_batch(t, e, p, changes, st_s, t0, t1, *limits, *out)
        return run

    fns = {
        "stream1": lambda: stream(t, e, False), "halves1": lambda: stream(t, e, True), "kernel1": kernel(),
        "stream2": lambda: stream_parallel(t, e, False, threads), "halves2": lambda: stream_parallel(t, e, True, threads),
        "kernel2": kernel(parallel=True), "between1": kernel(changes=st_between),
    }
    energy.warm_up_batch()
    for f in fns.values():
        f()
    kernel(parallel=True)()
    par = [a.copy() for a in out]
    kernel()()
    check(t, e, p, st_t, st_s, t0, t1, limits, out, par)
    np_kwh, np_est, np_q = numpy_batch(t, e, p, st_t, st_s, t0, t1)
    assert np.array_equal(np_kwh, out[0]) and np.array_equal(np_est, out[1]), "NumPy and the kernel disagree"
    counts = [Q_GAPS, Q_RESETS, Q_ROLLOVERS, Q_JUMPS]
    assert np.array_equal(np_q[:, counts], out[2][:, counts]), "NumPy and the kernel count differently"
    assert np_q[:, [Q_GAPS, Q_RESETS, Q_JUMPS]].sum(axis=0).min() > 0 and np_est.sum() > 0, "a fault is missing"

    times = timed(fns, ROUNDS)
    numpy_times = timed({"numpy": lambda: numpy_batch(t, e, p, st_t, st_s, t0, t1)}, NUMPY_ROUNDS)["numpy"]
    limit = {k: np.minimum(times[f"stream{k}"], times[f"halves{k}"]) for k in (1, 2)}
    rate = {name: N / v.min() for name, v in times.items()}
    rate["numpy"] = N / numpy_times.min()

    def speed(name):
        return f"{rate[name] / 1e6:5.0f} M samples/s ({rate[name] * BYTES / 1e9:4.1f} GB/s)"

    def share(name, k):
        r = limit[k] / times[name]
        return (f"{speed(name)} = {np.median(r):.2f} of the {k}-thread limit, median of {ROUNDS} rounds "
                f"(range {r.min():.2f}-{r.max():.2f})")

    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus; numba {numba.__version__} ({numba.threading_layer()} "
          f"threads), numpy {np.__version__}")
    print(f"data: {N:,} samples, {jobs:,} jobs, {len(st_t):,} state changes; t f64, e f64, p f32: "
          f"{BYTES} bytes/sample to read in counter runs")
    for k in (1, 2):
        print(f"read t and e, {k} thread{'s' if k > 1 else ''}: front to back {speed(f'stream{k}')}, "
              f"by halves {speed(f'halves{k}')}")
    print(f"job_energy_batch, 1 thread:           {share('kernel1', 1)}; floor {FLOORS[1]}")
    print(f"job_energy_batch_parallel, 2 threads: {share('kernel2', 2)}; floor {FLOORS[2]}")
    print(f"  per round: 1 thread {' '.join(f'{x:.2f}' for x in limit[1] / times['kernel1'])}; "
          f"2 threads {' '.join(f'{x:.2f}' for x in limit[2] / times['kernel2'])}")
    print(f"changes between samples, 1 thread:    {share('between1', 1)}")
    print(f"NumPy, the same result, 1 thread:     {speed('numpy')}, best of {NUMPY_ROUNDS}; the kernel is "
          f"{rate['kernel1'] / rate['numpy']:.1f}x that with 1 thread, {rate['kernel2'] / rate['numpy']:.1f}x with 2 "
          f"(best of {ROUNDS})")
    print("checked: every 50th row == job_energy bit for bit, 2 threads == 1 thread, NumPy == kernel")
    print(f"command: BENCH_SAMPLES={N:.0e} BENCH_ROUNDS={ROUNDS} .venv/bin/python benchmarks/bench_kernel.py")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()

if __name__ == "__main__":
    main()
