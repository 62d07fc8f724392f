"""Job-energy kernel throughput, measured against two references in the same run.

1. A streaming reference: a numba loop that reads exactly the bytes the kernel reads
   (t, e, p: 3 x float64 = 24 bytes per sample) and does nothing else. Its rate is the
   memory-bandwidth limit for this layout on this machine, one thread.
2. A NumPy reference: per-interval counter deltas summed by the state at the start of each
   interval (np.diff + np.searchsorted + np.bincount). It computes *less* than the kernel (no
   split of an interval at a state change or at the window edges, no gap/reset/rollover
   checks), so it is a lower bound on what plain NumPy needs.

Prints samples/s and the ratios; nothing here is asserted. Size: BENCH_SAMPLES (default 1e8).
Run: make bench   (or: .venv/bin/python benchmarks/bench_kernel.py)
"""

from __future__ import annotations

import os
import time

import numba
import numpy as np

from agent import energy, states

N = int(float(os.environ.get("BENCH_SAMPLES", "1e8")))
REPEAT = 3


@numba.njit(cache=True)
def stream(t, e, p):
    acc = 0.0
    for i in range(t.size):
        acc += t[i] + e[i] + p[i]
    return acc


def numpy_reference(t, e, st_t, st_s):
    de = np.diff(e)
    k = np.searchsorted(st_t, t[:-1], side="right") - 1
    return np.bincount(st_s[np.maximum(k, 0)], weights=de, minlength=states.N_STATES)


def best(fn, *args) -> float:
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(N, dtype=np.float64)  # 1 Hz samples
    seg = 600  # a state change every 10 minutes
    st_t = np.arange(0, N, seg, dtype=np.float64)
    st_s = (np.arange(st_t.size) % 4 + 2).astype(np.uint8)  # ready, processing, interrupted, setup
    level = np.array([0, 300, 1200, 9000, 1800, 2600], dtype=np.float64)
    p = level[np.repeat(st_s, seg)[:N]] * (1 + 0.02 * rng.standard_normal(N))
    e = 1000.0 + np.concatenate(([0.0], np.cumsum((p[1:] + p[:-1]) / 2))) / 3.6e6
    args = (t, e, p, st_t, st_s, t[0], t[-1], 5.0, 0.0, 0.0)

    energy.job_energy(*args)  # compile or load from cache
    stream(t, e, p)
    ours = best(energy.job_energy, *args)
    ref = best(stream, t, e, p)
    npy = best(numpy_reference, t, e, st_t, st_s)

    kwh, _, _ = energy.job_energy(*args)
    check = numpy_reference(t, e, st_t, st_s)
    # State changes fall on samples here, so both attribute each interval to the same state.
    assert np.allclose(kwh, check, rtol=1e-9, atol=1e-9), (kwh, check)

    bytes_per_sample = 3 * 8
    print(f"samples: {N:,} ({bytes_per_sample} bytes each: t, e, p as float64); best of {REPEAT}; "
          f"numba {numba.__version__}, numpy {np.__version__}")
    print(f"kernel (job_energy, 1 thread):  {N / ours / 1e6:8.1f} M samples/s  ({N * bytes_per_sample / ours / 1e9:.2f} GB/s)")
    print(f"streaming reference (1 thread): {N / ref / 1e6:8.1f} M samples/s  ({N * bytes_per_sample / ref / 1e9:.2f} GB/s)")
    print(f"NumPy reference (less work):    {N / npy / 1e6:8.1f} M samples/s")
    print(f"kernel / bandwidth limit = {ref / ours:.2f}")
    print(f"kernel / NumPy           = {npy / ours:.2f}x faster")


if __name__ == "__main__":
    main()
