"""Energy kernel against closed-form truth.

Power profiles are chosen so that the true energy has a closed form; the counter, where used,
is that exact integral sampled at the sample times (optionally quantised like a register).
Each tolerance says why it is what it is. The kernels are pure: no services, no sleeps.
"""

import math

import numpy as np
import pytest

from energy_agent.core.states import CODE, N_STATES
from energy_agent.domain import energy
from energy_agent.domain.energy import compute_job

READY, PROCESSING, INTERRUPTED = CODE["ready"], CODE["processing"], CODE["interrupted"]
WS = 1.0 / 3.6e6  # kWh per W s
# Float64 arithmetic on O(100) terms: rounding is ~1e-15 relative, so 1e-12 means "exact".
EXACT = 1e-12


def one_state(code=PROCESSING):
    return np.array([0.0]), np.array([code], np.uint8)


# Ramp P(t) = 1000 + 50 t W; the trapezoid model is exact for it, so these paths must be exact.
def ramp_p(t):
    return 1000.0 + 50.0 * np.asarray(t, float)


def ramp_e(t):  # kWh since t = 0, plus a 10 kWh offset like a real counter
    t = np.asarray(t, float)
    return 10.0 + (1000.0 * t + 25.0 * t * t) * WS


def ramp_kwh(x, y):
    return float(ramp_e(y) - ramp_e(x))


def run_ramp(t, t0, t1, *, counter=True, power=True, max_gap_s=5.0, e=None, p=None, **kw):
    e = ramp_e(t) if e is None else e
    p = ramp_p(t) if p is None else p
    if not counter:
        e = np.full_like(t, np.nan)
    if not power:
        p = np.full_like(t, np.nan)
    return compute_job(t, e, p, *one_state(), t0, t1, max_gap_s, **kw)


# ------------------------------------------------------------------ smooth power, one state


@pytest.mark.parametrize("path", ["counter", "power"])
def test_constant_power_window_between_samples(path):
    t = np.arange(0.0, 101.0)
    watts = 5000.0
    e = 10.0 + watts * t * WS if path == "counter" else np.full_like(t, np.nan)
    r = compute_job(t, e, np.full_like(t, watts), *one_state(), 3.37, 57.81, 5.0)
    truth = watts * (57.81 - 3.37) * WS
    assert r.kwh == pytest.approx(truth, rel=EXACT, abs=0)
    assert r.kwh_by_state[PROCESSING] == r.kwh and sum(r.kwh_by_state) == r.kwh
    assert r.method == path
    assert r.estimated_kwh == (r.kwh if path == "power" else 0.0)
    assert (r.coverage, r.gap_count, r.longest_gap_s) == (1.0, 0, 0.0)


@pytest.mark.parametrize("path", ["counter", "power"])
def test_ramp_is_exact_with_irregular_samples(path):
    rng = np.random.default_rng(7)
    t = np.cumsum(rng.uniform(0.5, 1.5, 120))
    t0, t1 = t[3] + 0.37, t[100] + 0.81
    r = run_ramp(t, t0, t1, counter=path == "counter")
    assert r.kwh == pytest.approx(ramp_kwh(t0, t1), rel=EXACT, abs=0)
    assert r.method == path and r.coverage == 1.0


@pytest.mark.parametrize("path", ["counter", "power"])
def test_sinusoid_with_ripple_within_interpolation_bound(path):
    p0, a1, w1, a2, w2 = 3000.0, 1500.0, 2 * math.pi / 60, 200.0, 2 * math.pi / 7
    dt = 1.0
    t = np.arange(0.0, 411.0, dt)
    p = p0 + a1 * np.sin(w1 * t) + a2 * np.sin(w2 * t)

    def energy_ws(x):
        return p0 * x + a1 / w1 * (1 - np.cos(w1 * x)) + a2 / w2 * (1 - np.cos(w2 * x))

    e = energy_ws(t) * WS if path == "counter" else np.full_like(t, np.nan)
    t0, t1 = 3.37, 403.81
    r = compute_job(t, e, p, *one_state(), t0, t1, 5.0)
    truth_ws = energy_ws(t1) - energy_ws(t0)
    # Linear interpolation of P deviates from P by at most delta = dt^2 max|P''| / 8.
    delta = dt * dt * (a1 * w1 * w1 + a2 * w2 * w2) / 8
    if path == "power":
        # Every piece of the window integrates the interpolant: |error| <= (t1 - t0) delta.
        bound = (t1 - t0) * delta
    else:
        # Whole intervals are exact counter deltas d; only the two boundary intervals split d by
        # interpolant weights: |d (S + es) / (d + ei) - S| <= 2 dt delta d / (d - dt delta).
        d_min = (p0 - a1 - a2) * dt
        bound = 2 * (2 * dt * delta * d_min / (d_min - dt * delta))
    assert abs(r.kwh / WS - truth_ws) <= bound
    assert r.method == path


# ------------------------------------------------------------------ operating states


def piecewise(changes, watts):
    """Piecewise-constant power: state codes from the change times, power by state."""
    st_t = np.array([c[0] for c in changes])
    st_s = np.array([c[1] for c in changes], np.uint8)

    def power(x):
        return np.array([watts[st_s[max(np.searchsorted(st_t, v, "right") - 1, 0)]] for v in np.atleast_1d(x)])

    def by_state(x, y):  # W s per state over [x, y]
        out = np.zeros(N_STATES)
        ends = np.append(st_t[1:], np.inf)
        for start, end, s in zip(st_t, ends, st_s):
            out[s] += watts[s] * max(0.0, min(end, y) - max(start, x))
        return out

    return st_t, st_s, power, by_state


@pytest.mark.parametrize("path", ["counter", "power"])
def test_piecewise_constant_states_are_exact_per_state(path):
    # Changes between samples (20.4, 70.7) and on a sample (80.0); the first entry lies after
    # t[0], so the state before it is st_s[0]. The step model is exact here, both paths.
    watts = {READY: 1000.0, PROCESSING: 8000.0, INTERRUPTED: 2000.0}
    changes = [(2.0, READY), (20.4, PROCESSING), (70.7, INTERRUPTED), (80.0, PROCESSING)]
    st_t, st_s, power, by_state = piecewise(changes, watts)
    t = np.arange(0.0, 101.0)
    e = np.array([by_state(0.0, x).sum() for x in t]) * WS if path == "counter" else np.full_like(t, np.nan)
    t0, t1 = 5.5, 90.25
    r = compute_job(t, e, power(t), st_t, st_s, t0, t1, 5.0)
    truth = by_state(t0, t1) * WS
    assert np.allclose(r.kwh_by_state, truth, rtol=EXACT, atol=1e-15)
    assert r.kwh == pytest.approx(truth.sum(), rel=EXACT, abs=0)
    assert r.method == path


def test_state_shorter_than_a_sample_interval_gets_the_mean_power():
    # Ready 1 kW until 4.2, processing 8 kW on [4.2, 4.7), interrupted 2 kW after: processing is
    # never sampled, so the contract gives it mean(p4, p5) = 1.5 kW. The counter delta keeps the
    # total exact; the split of that one interval follows the weights 200 : 750 : 600 W s.
    watts = {READY: 1000.0, PROCESSING: 8000.0, INTERRUPTED: 2000.0}
    st_t, st_s, power, by_state = piecewise([(0.0, READY), (4.2, PROCESSING), (4.7, INTERRUPTED)], watts)
    t = np.arange(0.0, 11.0)
    e = np.array([by_state(0.0, x).sum() for x in t]) * WS
    r = compute_job(t, e, power(t), st_t, st_s, 0.0, 10.0, 5.0)
    d = 200.0 + 4000.0 + 600.0
    expected = np.zeros(N_STATES)
    expected[[READY, PROCESSING, INTERRUPTED]] = [4000.0 + d * 200 / 1550, d * 750 / 1550, 10000.0 + d * 600 / 1550]
    assert np.allclose(r.kwh_by_state, expected * WS, rtol=EXACT, atol=1e-15)
    assert r.kwh == pytest.approx(by_state(0.0, 10.0).sum() * WS, rel=EXACT, abs=0)


def test_back_to_back_jobs_share_the_boundary_interval():
    # Job A processes at 8 kW until 50.5, job B sets up at 3 kW from 50.5 (between samples).
    watts = {PROCESSING: 8000.0, CODE["setup"]: 3000.0}
    st_t, st_s, power, by_state = piecewise([(0.0, PROCESSING), (50.5, CODE["setup"])], watts)
    t = np.arange(0.0, 101.0)
    e = 10.0 + np.array([by_state(0.0, x).sum() for x in t]) * WS
    a, b = (compute_job(t, e, power(t), st_t, st_s, x, y, 5.0) for x, y in [(3.0, 50.5), (50.5, 97.0)])
    # The boundary interval [50, 51] is split between the jobs; nothing is lost or counted twice.
    assert a.kwh + b.kwh == pytest.approx(e[97] - e[3], rel=EXACT, abs=0)
    assert a.kwh == pytest.approx(by_state(3.0, 50.5).sum() * WS, rel=EXACT, abs=0)
    assert b.kwh == pytest.approx(by_state(50.5, 97.0).sum() * WS, rel=EXACT, abs=0)
    assert a.kwh_by_state[PROCESSING] == a.kwh and b.kwh_by_state[CODE["setup"]] == b.kwh


def test_job_at_the_end_of_a_long_buffer():
    t = np.arange(0.0, 1_000_000.0)
    r = run_ramp(t, 999_000.5, 999_010.5)
    # Binary search finds the job's intervals. The counter is near 6.9e6 kWh, where float64
    # readings (and the truth's own difference) carry ~1e-9 kWh; the job has ~139 kWh.
    assert r.kwh == pytest.approx(ramp_kwh(999_000.5, 999_010.5), rel=1e-10)


# ------------------------------------------------------------------ counter registers


def _quantized_ramp(kind):
    t = np.arange(0.0, 201.0)
    p = 20000.0 + 100.0 * t
    e_ws = 20000.0 * t + 50.0 * t * t
    if kind == "float32":
        e = np.float32(12345.6 + e_ws * WS).astype(np.float64)
        step = float(np.spacing(np.float32(e[-1])))  # 2**-10 kWh in [8192, 16384)
    else:
        e = np.floor(12_345_600.0 + e_ws / 3600.0) / 1000.0  # integer Wh register, truncating
        step = 0.001
    return t, e, p, step


@pytest.mark.parametrize("kind", ["float32", "integer_wh"])
def test_quantized_counter_within_one_step(kind):
    t, e, p, step = _quantized_ramp(kind)
    t0, t1 = 3.37, 157.81
    r = compute_job(t, e, p, *one_state(), t0, t1, 5.0)
    truth = (20000.0 * (t1 - t0) + 50.0 * (t1 * t1 - t0 * t0)) * WS
    # E = (e_k1 - e_k0) + f0 (e_k0 - e_k0-1) + f1 (e_k1+1 - e_k1) with exact fractions f; the
    # reading errors (|eta| <= step/2 rounding, eta in (-step, 0] truncating) combine with
    # weights (1-f1), f1, (1-f0), f0 to at most one step, well inside the 2-step requirement.
    assert abs(r.kwh - truth) <= step
    assert r.method == "counter"


@pytest.mark.parametrize("max_power_w", [0.0, 50000.0])
def test_u32_wh_counter_rollover(max_power_w):
    t = np.arange(0.0, 101.0)
    e_ws = 1000.0 * t + 25.0 * t * t
    raw = (2**32 - 60 + np.floor(e_ws / 3600.0)) % 2**32  # wraps after ~60 Wh
    r = run_ramp(t, 3.37, 97.81, e=raw * 0.001, rollover_kwh=2**32 * 0.001, max_power_w=max_power_w)
    assert abs(r.kwh - ramp_kwh(3.37, 97.81)) <= 0.001  # one Wh step, as derived above
    assert (r.counter_rollovers, r.counter_resets, r.counter_jumps) == (1, 0, 0)
    assert r.method == "counter"


@pytest.mark.parametrize("rollover_kwh", [0.0, 2**32 * 0.001])
def test_counter_reset_falls_back_to_power(rollover_kwh):
    t = np.arange(0.0, 101.0)
    e = ramp_e(t)
    e[50:] -= e[50]  # the counter restarts from 0 at t = 50
    # With a wrap value set, delta + wrap is far above 1.5 x max power: still a reset.
    r = run_ramp(t, 3.37, 97.81, e=e, rollover_kwh=rollover_kwh, max_power_w=50000.0)
    assert r.counter_resets == 1 and r.counter_rollovers == 0
    assert r.kwh == pytest.approx(ramp_kwh(3.37, 97.81), rel=EXACT, abs=0)
    assert r.estimated_kwh == pytest.approx(ramp_kwh(49.0, 50.0), rel=EXACT, abs=0)
    assert r.method == "mixed" and r.coverage == 1.0 and r.gap_count == 0


def test_reset_of_unsigned_counter_without_power_limit_is_not_a_rollover():
    # A u32 Wh counter (wraps at 2**32 Wh) reset to 0 from mid-range, with no max_power_w known:
    # adding the wrap value would claim ~4.29 GWh. A wrap must leave a small part of the range.
    t = np.arange(0.0, 101.0)
    e = ramp_e(t) + 2**31 * 0.001  # mid-range
    e[50:] -= e[50]
    r = run_ramp(t, 3.37, 97.81, e=e, rollover_kwh=2**32 * 0.001, max_power_w=0.0)
    assert (r.counter_resets, r.counter_rollovers) == (1, 0)
    # float64 readings near 2.1e6 kWh carry ~5e-10 kWh each: two of them bound the error.
    assert r.kwh == pytest.approx(ramp_kwh(3.37, 97.81), rel=0, abs=1e-9)


def test_counter_reset_without_power_leaves_a_gap():
    t = np.arange(0.0, 101.0)
    e = ramp_e(t)
    e[50:] -= e[50]
    # Without power the boundary intervals are split by time (not exact for a ramp): the window
    # is put on sample times so that the truth stays closed-form.
    r = run_ramp(t, 3.0, 97.0, e=e, power=False)
    assert min(r.kwh_by_state) >= 0.0 and r.counter_resets == 1
    assert r.kwh == pytest.approx(ramp_kwh(3.0, 97.0) - ramp_kwh(49.0, 50.0), rel=EXACT, abs=0)
    assert (r.gap_count, r.longest_gap_s) == (1, 1.0)
    assert r.coverage == pytest.approx(1 - 1.0 / 94.0, rel=EXACT)


@pytest.mark.parametrize("power", [True, False])
def test_implausible_jump_is_not_energy(power):
    t = np.arange(0.0, 101.0)
    e = ramp_e(t)
    e[60:] += 1000.0  # +1000 kWh in one second: 3.6 GW, against a 50 kW limit
    r = run_ramp(t, 3.0, 97.0, e=e, power=power, max_power_w=50000.0)  # on samples: see above
    assert r.counter_jumps == 1
    lost = 0.0 if power else ramp_kwh(59.0, 60.0)  # power fallback is exact for the ramp
    assert r.kwh == pytest.approx(ramp_kwh(3.0, 97.0) - lost, rel=EXACT, abs=0)
    assert r.estimated_kwh == pytest.approx(ramp_kwh(59.0, 60.0) if power else 0.0, rel=EXACT, abs=0)


# ------------------------------------------------------------------ gaps and bad readings


@pytest.mark.parametrize("path", ["counter", "power"])
def test_thirty_second_gap(path):
    t = np.concatenate([np.arange(0.0, 41.0), np.arange(70.0, 101.0)])
    t0, t1 = 3.37, 97.81
    r = run_ramp(t, t0, t1, counter=path == "counter", max_gap_s=5.0)
    assert (r.gap_count, r.longest_gap_s) == (1, 30.0)
    if path == "counter":  # the counter integrated through the gap: measured, covered
        assert r.kwh == pytest.approx(ramp_kwh(t0, t1), rel=EXACT, abs=0)
        assert r.coverage == 1.0
    else:  # not invented: exactly the gap's energy is missing
        assert r.kwh == pytest.approx(ramp_kwh(t0, t1) - ramp_kwh(40.0, 70.0), rel=EXACT, abs=0)
        assert r.coverage == pytest.approx((t1 - t0 - 30.0) / (t1 - t0), rel=EXACT)


@pytest.mark.parametrize("column", ["e", "p", "p_power_only"])
def test_single_nan_reading(column):
    t = np.arange(0.0, 101.0)
    e, p = ramp_e(t), ramp_p(t)
    (e if column == "e" else p)[30] = np.nan
    r = run_ramp(t, 3.37, 97.81, e=e, p=p, counter=column != "p_power_only")
    truth = ramp_kwh(3.37, 97.81)
    if column == "e":  # both intervals touching the bad reading fall back to power, exactly
        assert r.kwh == pytest.approx(truth, rel=EXACT, abs=0)
        assert r.estimated_kwh == pytest.approx(ramp_kwh(29.0, 31.0), rel=EXACT, abs=0)
        assert (r.method, r.gap_count, r.coverage) == ("mixed", 0, 1.0)
    elif column == "p":  # the counter does not need power
        assert r.kwh == pytest.approx(truth, rel=EXACT, abs=0)
        assert (r.method, r.gap_count, r.coverage) == ("counter", 0, 1.0)
    else:  # power only: the two intervals around the bad reading are two 1 s gaps
        assert r.kwh == pytest.approx(truth - ramp_kwh(29.0, 31.0), rel=EXACT, abs=0)
        assert (r.method, r.gap_count, r.longest_gap_s) == ("power", 2, 1.0)
        assert r.coverage == pytest.approx(1 - 2.0 / (97.81 - 3.37), rel=EXACT)


def test_kernel_is_not_compiled_with_nan_unsafe_fastmath():
    assert not {"nnan", "ninf", "fast"} & set(energy.FASTMATH)


@pytest.mark.parametrize("n, t0, t1", [(101, 200.0, 250.0), (101, -50.0, -10.0), (1, -20.0, 20.0), (0, 0.0, 40.0)])
def test_window_without_sample_intervals(n, t0, t1):
    r = run_ramp(np.arange(0.0, float(n)), t0, t1)
    assert (r.kwh, r.estimated_kwh, r.coverage, r.method) == (0.0, 0.0, 0.0, "none")
    assert (r.gap_count, r.longest_gap_s) == (1, t1 - t0)


def test_window_starting_before_the_first_sample():
    t = np.arange(0.0, 101.0)
    r = run_ramp(t, -10.0, 20.0)
    assert r.kwh == pytest.approx(ramp_kwh(0.0, 20.0), rel=EXACT, abs=0)
    assert (r.gap_count, r.longest_gap_s, r.method) == (1, 10.0, "counter")
    assert r.coverage == pytest.approx(20.0 / 30.0, rel=EXACT)


def test_zero_length_window():
    r = run_ramp(np.arange(0.0, 101.0), 10.5, 10.5)
    assert (r.kwh, r.coverage, r.gap_count, r.method) == (0.0, 1.0, 0, "none")


def test_quality_vector_of_the_kernel():
    t = np.arange(0.0, 101.0)
    e = ramp_e(t)
    e[50:] -= e[50]
    kwh, est, q = energy.job_energy(t, e, ramp_p(t), *one_state(), 3.37, 97.81, 5.0, 0.0, 0.0)
    names = [n for n in dir(energy) if n.startswith("Q_")]
    assert sorted(getattr(energy, n) for n in names) == list(range(energy.NQ))
    assert q[energy.Q_COUNTER_KWH] + q[energy.Q_POWER_KWH] == pytest.approx(kwh.sum(), rel=EXACT)
    assert q[energy.Q_POWER_KWH] == pytest.approx(est.sum(), rel=EXACT)
    assert (q[energy.Q_WINDOW_S], q[energy.Q_COVERED_S], q[energy.Q_POWER_S]) == (97.81 - 3.37, 97.81 - 3.37, 1.0)
    assert q[energy.Q_COUNTER_S] == pytest.approx(97.81 - 3.37 - 1.0, rel=EXACT)
    assert (q[energy.Q_RESETS], q[energy.Q_GAPS]) == (1, 0)


@pytest.mark.parametrize("counter, power, method", [(True, False, "counter"), (False, True, "power"),
                                                    (True, True, "mixed")])
def test_method_of_a_machine_drawing_nothing(counter, power, method):
    # Zero energy everywhere: the method comes from what covered the window.
    t = np.arange(0.0, 11.0)
    e = np.full_like(t, 5.0) if counter else np.full_like(t, np.nan)
    if counter and power:
        e[5:] = np.nan  # counter for the first half, power for the rest
    r = compute_job(t, e, np.zeros_like(t) if power else np.full_like(t, np.nan), *one_state(), 0.5, 9.5, 5.0)
    assert (r.kwh, r.coverage, r.method) == (0.0, 1.0, method)


# ------------------------------------------------------------------ inputs


def _args(**change):
    t = np.arange(0.0, 11.0)
    args = dict(t=t, e=ramp_e(t), p=ramp_p(t), st_t=np.array([0.0]), st_s=np.array([READY], np.uint8),
                t0=1.5, t1=8.5, max_gap_s=5.0)
    args.update(change)
    return args


@pytest.mark.parametrize("change, message", [
    (dict(t=np.array([0.0, 1.0, 2.0, 2.0, 4.0] + list(range(5, 11)), float)), r"strictly increasing: t\[2\]"),
    (dict(t=np.array([0.0, np.nan] + list(range(2, 11)), float)), "t .* finite"),
    (dict(t=np.zeros((11, 1))), "t must be one-dimensional"),
    (dict(e=np.zeros(10)), "same length"),
    (dict(t0=9.0, t1=8.0), "ends before it starts"),
    (dict(t0=float("nan")), "t0 must be a finite number"),
    (dict(st_t=np.array([]), st_s=np.array([], np.uint8)), "non-empty"),
    (dict(st_t=np.array([5.0, 1.0]), st_s=np.array([1, 2])), "sorted"),
    (dict(st_s=np.array([N_STATES])), "state codes"),
    (dict(max_gap_s=-1.0), "max_gap_s must be >= 0"),
])
def test_invalid_inputs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        compute_job(**_args(**change))


def test_compute_job_normalises_inputs_to_the_one_compiled_signature():
    # numba's signatures show what was compiled: one, whatever the caller passed.
    compute_job(**_args())
    signatures = list(energy.job_energy.signatures)
    assert len(signatures) == 1
    a = _args()
    readonly = a["p"].copy()
    readonly.flags.writeable = False
    # Lists, ints, float32, read-only and strided arrays are all normalised to one signature.
    r = compute_job(list(a["t"]), a["e"].astype(np.float32), readonly, [0], [READY], 1, 8, 5)
    compute_job(np.arange(0.0, 22.0)[::2] / 2, a["e"], a["p"], a["st_t"], a["st_s"], 1.5, 8.5, 5.0)
    assert energy.job_energy.signatures == signatures
    assert r.kwh > 0
