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
a galloping search from where the previous window ended (from index 0 for the first window)
and the state timeline is walked with a pointer that only moves forward.
``compute_job`` validates inputs and wraps the result; ``compute_jobs`` / ``energy_batch`` do
the same for many windows of one machine at once (a replay), with ``job_energy_batch`` and its
``prange`` twin, bit-identical to ``job_energy`` per window. The kernels themselves live in
``energy_agent.domain.kernels`` (plain ``@njit(cache=True)``, compiled once and then loaded from
numba's cache). ``warm_up`` loads the one ``compute_job`` uses and ``warm_up_batch`` the batch
kernels; the agent calls ``warm_up`` in a worker thread, so no poll waits for a compiler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from energy_agent.core.states import N_STATES

if TYPE_CHECKING:
    from energy_agent.core.record import Method

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class JobEnergy:
    kwh_by_state: tuple[float, ...]
    """kWh per operating state; the index is the state code (``energy_agent.core.states.STATES``)."""
    kwh: float
    estimated_kwh: float
    """Part of ``kwh`` from power integration rather than counter deltas."""
    method: Method
    """"counter", "power", "mixed", or "none" (no part of the window covered)."""
    coverage: float
    """Covered share of the window, 1.0 for a zero-length window."""
    gap_count: int
    longest_gap_s: float
    counter_resets: int
    counter_rollovers: int
    counter_jumps: int


@dataclass(frozen=True, eq=False)  # arrays: equal means the same object
class JobInputs:
    """What ``compute_job`` received for one job, copied out of the tracker's buffers (the raw-sample
    archive keeps it, so that a replay can recompute the record)."""

    t: np.ndarray
    e: np.ndarray
    p: np.ndarray
    st_t: np.ndarray
    st_s: np.ndarray
    t0: float
    t1: float
    max_gap_s: float
    rollover_kwh: float
    max_power_w: float
    bad_t: np.ndarray
    """Times of failed or bad meter reads inside the window (the record's ``bad_samples``)."""
    flags: tuple[str, ...]
    """The job's own flags, before the energy adds ``estimated_energy``/``incomplete_coverage``."""

    def args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                            float, float, float, float, float]:
        """The positional arguments of ``compute_job``."""
        return (self.t, self.e, self.p, self.st_t, self.st_s, self.t0, self.t1, self.max_gap_s,
                self.rollover_kwh, self.max_power_w)




def capture(t: ArrayLike, e: ArrayLike, p: ArrayLike, st_t: ArrayLike, st_s: ArrayLike, t0: float, t1: float,
            max_gap_s: float, rollover_kwh: float, max_power_w: float,
            bad_times: Iterable[float], flags: Iterable[str]) -> JobInputs:
    """A copy of the kernel's inputs for one span (the tracker's buffers are reused): what its
    energy is computed from, and what the raw-sample archive keeps."""
    bad = np.array([b for b in bad_times if t0 <= b <= t1], np.float64)
    return JobInputs(np.array(t, np.float64), np.array(e, np.float64), np.array(p, np.float64),
                     np.array(st_t, np.float64), np.array(st_s, np.uint8), float(t0), float(t1),
                     float(max_gap_s), float(rollover_kwh), float(max_power_w), bad, tuple(sorted(flags)))


def _column(name: str, x: ArrayLike, dtype: DTypeLike) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    # A read-only array is a different numba type: it would compile a second specialisation.
    return a if a.flags.writeable else a.copy()


def _number(name: str, x: float, minimum: float | None = None) -> float:
    v = float(x)
    if math.isnan(v) or (minimum is None and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x!r}")
    return v


def compute_job(t: ArrayLike, e: ArrayLike, p: ArrayLike, st_t: ArrayLike, st_s: ArrayLike, t0: float, t1: float,
                max_gap_s: float, rollover_kwh: float = 0.0, max_power_w: float = 0.0) -> JobEnergy:
    """Validate and normalise the inputs, run ``job_energy`` and summarise its result."""
    t, e, p = _samples(t, e, p, np.float64, np.float64)
    st_t, st_s = _timeline(st_t, st_s)
    t0, t1 = _number("t0", t0), _number("t1", t1)
    if t1 < t0:
        raise ValueError(f"job window ends before it starts: t0={t0!r} > t1={t1!r}")
    limits = _limits(max_gap_s, rollover_kwh, max_power_w)
    from energy_agent.domain.kernels import job_energy

    return _summary(*job_energy(t, e, p, st_t, st_s, t0, t1, *limits))


def compute_jobs(t: ArrayLike, e: ArrayLike, p: ArrayLike, st_t: ArrayLike, st_s: ArrayLike, t0: ArrayLike,
                 t1: ArrayLike, max_gap_s: float, rollover_kwh: float = 0.0, max_power_w: float = 0.0, *,
                 parallel: bool = False) -> list[JobEnergy]:
    """``compute_job`` for many windows [t0[k], t1[k]] over one machine's samples (a replay).

    Element k equals ``compute_job`` of window k exactly, also with e or p passed as float32
    (kept as float32 here, fewer bytes to read; the agent's float64 holds the same values when
    the meter delivers float32). ``parallel`` runs ``job_energy_batch_parallel`` on numba's
    threads; the result is the same.
    """
    kwh, est, q = energy_batch(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w,
                               parallel=parallel)
    return [_summary(kwh[k], est[k], q[k]) for k in range(len(q))]


def energy_batch(t: ArrayLike, e: ArrayLike, p: ArrayLike, st_t: ArrayLike, st_s: ArrayLike, t0: ArrayLike,
                 t1: ArrayLike, max_gap_s: float, rollover_kwh: float = 0.0, max_power_w: float = 0.0, *,
                 parallel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    from energy_agent.domain import kernels

    if parallel:
        chunks = batch_chunks(t, t0, t1, kernels.numba.get_num_threads())
        kernels.job_energy_batch_parallel(t, e, p, st_t, st_s, t0, t1, *limits, kwh, est, q, chunks)
    else:
        kernels.job_energy_batch(t, e, p, st_t, st_s, t0, t1, *limits, kwh, est, q)
    return kwh, est, q


def batch_chunks(t: np.ndarray, t0: np.ndarray, t1: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries splitting the jobs into ``parts`` contiguous ranges of about equal samples."""
    work = np.searchsorted(t, t1, "right") - np.searchsorted(t, t0, "left") + 1  # + 1: a search
    edges = np.searchsorted(np.cumsum(work), np.linspace(0, work.sum(), parts + 1)[1:-1], "left")
    return np.concatenate(([0], edges, [len(t0)])).astype(np.int64)


def _lean(x: ArrayLike) -> type:
    """float32 stays float32 (converts to float64 exactly in the kernel); anything else float64."""
    return np.float32 if getattr(x, "dtype", None) == np.float32 else np.float64


def _samples(t: ArrayLike, e: ArrayLike, p: ArrayLike, e_dtype: DTypeLike,
             p_dtype: DTypeLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, e, p = _column("t", t, np.float64), _column("e", e, e_dtype), _column("p", p, p_dtype)
    if not len(t) == len(e) == len(p):
        raise ValueError(f"t, e and p must have the same length, got {len(t)}, {len(e)}, {len(p)}")
    if not np.all(np.isfinite(t)):
        raise ValueError("t (sample times) must be finite")
    if len(t) > 1 and not np.all(np.diff(t) > 0):
        k = int(np.argmin(np.diff(t) > 0))
        raise ValueError(f"t (sample times) must be strictly increasing: t[{k}]={t[k]!r}, t[{k + 1}]={t[k + 1]!r}")
    return t, e, p


def _timeline(st_t: ArrayLike, st_s: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    st_t = _column("st_t", st_t, np.float64)
    codes = np.asarray(st_s)
    if len(st_t) == 0 or len(st_t) != len(codes):
        raise ValueError(f"st_t and st_s must be non-empty and of the same length, got {len(st_t)}, {len(codes)}")
    if not np.all(np.isfinite(st_t)) or np.any(np.diff(st_t) < 0):
        raise ValueError("st_t (state change times) must be finite and sorted")
    if codes.dtype.kind not in "ui" or codes.min() < 0 or codes.max() >= N_STATES:
        raise ValueError(f"st_s must hold integer state codes in [0, {N_STATES})")
    return st_t, _column("st_s", codes, np.uint8)


def _limits(max_gap_s: float, rollover_kwh: float, max_power_w: float) -> tuple[float, float, float]:
    return (_number("max_gap_s", max_gap_s, 0.0), _number("rollover_kwh", rollover_kwh, 0.0),
            _number("max_power_w", max_power_w, 0.0))


def _summary(kwh: np.ndarray, est: np.ndarray, q: np.ndarray) -> JobEnergy:
    window, covered = q[Q_WINDOW_S], q[Q_COVERED_S]
    # By the source of the energy; when all covered parts had zero energy, by covered time.
    by_counter, by_power = q[Q_COUNTER_KWH], q[Q_POWER_KWH]
    if by_counter <= 0.0 and by_power <= 0.0:
        by_counter, by_power = q[Q_COUNTER_S], q[Q_POWER_S]
    method: Method
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


def warm_up() -> str:
    """Compile (or load from numba's cache) the per-job kernel ``compute_job`` runs, and run it
    once; returns how long that took, for the start-up log."""
    import time

    started = time.perf_counter()
    t = np.array([0.0, 1.0, 2.0])
    st_t, st_s = t[:1].copy(), np.zeros(1, np.uint8)
    compute_job(t, t.copy(), t.copy(), st_t, st_s, 0.5, 1.5, 5.0)
    return f"{time.perf_counter() - started:.2f} s"


def warm_up_batch() -> None:
    """Compile (or load from cache) the batch kernels for the types ``compute_jobs`` passes:
    float64 samples, and float32 e and p (all four combinations), one thread and ``prange``."""
    t = np.array([0.0, 1.0, 2.0])
    st_t, st_s = t[:1].copy(), np.zeros(1, np.uint8)
    t0, t1 = np.array([0.5]), np.array([1.5])
    for e in (t.copy(), t.astype(np.float32)):
        for p in (t.copy(), t.astype(np.float32)):
            for parallel in (False, True):
                energy_batch(t, e, p, st_t, st_s, t0, t1, 5.0, parallel=parallel)


def __getattr__(name: str) -> Any:
    """The kernels themselves (``energy.job_energy`` …) without importing numba up front."""
    if name in ("job_energy", "job_energy_batch", "job_energy_batch_parallel", "FASTMATH"):
        from energy_agent.domain import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
