"""Every built-in meter profile, served by the simulator and decoded by the Modbus driver.

Parametrized over drivers/profiles/*.yaml, so a new profile file is covered without edits here.
"""

import time

import numpy as np
import pytest

from energy_agent.core.clock import Clock
from energy_agent.drivers import codec
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import PROFILE_DIR, MeterProfile, load_profile
from energy_agent.simulators.meter import MeterBank, physical_values
from energy_agent.simulators.scenario import Scenario
from energy_agent.simulators.services import free_port

PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))

PROCESSING_W = 4200.0
JOB_START_S = 10.0
POLL_AT_S = 60.0          # scenario time of the poll: inside the processing phase
SPEED = 20.0

COARSE_COUNTERS_KWH = {
    # Integer counters whose documented step is coarser than 1 Wh: the meter cannot do better.
    "carlogavazzi-em24": 0.1,   # INT32 kWh x10
    "abb-b23": 0.01,            # UINT64 in 0.01 kWh
}
TRUTH_SAMPLES = 65        # instants between the first and the last request at which the truth is taken


def counter_offset_kwh(prof: MeterProfile) -> float:
    """An energy offset that exercises the counter's type while it still resolves 1 Wh.

    32- and 64-bit integer and float64 counters: 123456.7 kWh (far from zero, inside their
    range). float32 counters lose resolution as they grow (at 123456.7 kWh a float32 kWh
    register resolves only 7.8 Wh), so they get the largest round value below which they
    still resolve 1 Wh.
    """
    p = prof.points["energy_import_kwh"]
    if p.type == "f32":
        return 4321.5  # a kWh register resolves 0.49 Wh there, a Wh register (4.3e6 Wh) 0.5 Wh
    return 123456.7


def resolution_kwh(prof: MeterProfile, value_kwh: float) -> float:
    """One step of the energy register at value_kwh, in kWh."""
    p = prof.points["energy_import_kwh"]
    if p.type[0] in "ui":
        return prof.counter_step_kwh()
    raw = (value_kwh - p.offset) / p.scale
    spacing = np.spacing(np.float32(raw)) if p.type == "f32" else np.spacing(np.float64(raw))
    return float(spacing) * abs(p.scale)


def point_step(prof: MeterProfile, q: str, value: float) -> float:
    """One step of quantity q's register at value, in the quantity's unit: the scale for an
    integer register (rounded or floored to it), the float32/float64 spacing for a float one."""
    p = prof.points[q]
    if p.type[0] in "ui":
        return abs(p.scale)
    raw = (value - p.offset) / p.scale
    spacing = np.spacing(np.float32(raw)) if p.type == "f32" else np.spacing(np.float64(raw))
    return float(spacing) * abs(p.scale)


def truth_range(machine, t0: float, t1: float) -> dict[str, tuple[float, float]]:
    """(lowest, highest) value of every quantity the healthy meter shows during [t0, t1].

    The driver's requests are served one after another inside [t0, t1], each at its own
    instant; power (with ripple) and the quantities derived from it may peak in between, so
    the range is taken over a fine grid of instants, not just the ends.
    """
    samples = [physical_values(machine, float(t)) for t in np.linspace(t0, t1, TRUTH_SAMPLES)]
    return {q: (min(s[q] for s in samples), max(s[q] for s in samples)) for q in samples[0]}


def scenario_for(name: str, offset_kwh: float, strict: bool = False) -> Scenario:
    return Scenario.model_validate({
        "name": f"profile-{name}",
        "speed": SPEED,
        "duration_s": 600,
        "machines": [{
            "id": "m1",
            "meter": {"unit_id": 3, "profile": name, "energy_offset_kwh": offset_kwh, "strict": strict,
                      "ripple": {"amplitude": 0.05, "period_s": 37.0, "phase": 0.4}},
            "cnc": {"channel": "M1.Channel_1", "job": "M1.Job"},
            "power_w": {"ready": 800.0, "processing": PROCESSING_W},
            "idle_state": "ready",
            "jobs": [{"job_id": "J-1", "program": "O1", "start_s": JOB_START_S,
                      "phases": [["processing", 300.0]]}],
        }],
    })


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_names_a_document_and_resolves_1_wh(name):
    prof = load_profile(name)
    assert prof.name == name
    assert prof.document.strip() and prof.vendor and prof.model
    assert {"power_w", "energy_import_kwh"} <= set(prof.points)
    assert prof.max_power_w is not None and prof.max_power_w >= 1.5 * PROCESSING_W
    p = prof.points["energy_import_kwh"]
    offset = counter_offset_kwh(prof)
    if p.type[0] in "ui":
        # The offset fits the integer type (a counter that wraps or overflows is no test).
        raw_max = 2 ** (16 * codec.width(p.type) - (1 if p.type[0] == "i" else 0)) - 1
        assert (offset - p.offset) / p.scale < raw_max
    step = resolution_kwh(prof, offset)
    assert step > 0
    assert step <= COARSE_COUNTERS_KWH.get(name, 0.001) + 1e-12, (
        f"{name}: the energy register resolves {step * 1000:g} Wh at {offset} kWh")


@pytest.mark.parametrize("name", PROFILES)
async def test_simulated_meter_decodes_with_the_driver(name):
    prof = load_profile(name)
    offset = counter_offset_kwh(prof)
    scn = scenario_for(name, offset)
    tl = scn.timelines["m1"]
    clock = Clock(speed=SPEED, anchor=time.time() - POLL_AT_S / SPEED)
    bank = MeterBank(scn, clock, port=free_port())
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=1.0)
    try:
        drv = MeterDriver(f"pm-{name}", 3, prof, bus, clock, timeout_s=1.0)
        t0 = bank.sim_time()
        r = await drv.poll()
        t1 = bank.sim_time()
        assert r.ok, r.error
        assert tl.state_at(t0) == "processing" and tl.state_at(t1) == "processing"

        step = resolution_kwh(prof, tl.counter_kwh(t1))
        e = r.values["energy_import_kwh"]
        assert tl.counter_kwh(t0) - step <= e <= tl.counter_kwh(t1) + step, (e, tl.counter_kwh(t0), step)
        assert e == pytest.approx(offset, abs=1.0)  # the offset came through (scale, word order)

        p = r.values["power_w"]
        lo, hi = sorted((tl.power_at(t0), tl.power_at(t1)))
        p_step = abs(prof.points["power_w"].scale) if prof.points["power_w"].type[0] in "ui" else 0.0
        assert lo - 2 - p_step <= p <= hi + 2 + p_step, (p, lo, hi)
        assert p < prof.max_power_w
    finally:
        await bus.close()
        await bank.stop()


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("name", PROFILES)
async def test_every_point_decodes_to_the_simulated_truth(name, strict):
    """All points of the profile (what `energy-agent probe` reads), decoded by the driver, equal
    what the simulated meter shows within one register step. A register whose type or scale
    cannot carry the value (overflow, too coarse a step), a decode that disagrees with the
    simulator's encoding or a point read from the wrong offset of a block moves a value far
    outside. The simulator serves the same profile, so agreement with the vendor's document is
    the profile's comments and README citations, not this test. A strict simulated meter maps
    only the profile's points, so it refuses every request that spans a gap (max_gap > 0): the
    driver splits them and the values are the same."""
    prof = load_profile(name)
    scn = scenario_for(name, counter_offset_kwh(prof), strict)
    (machine,) = scn.machines
    clock = Clock(speed=SPEED, anchor=time.time() - POLL_AT_S / SPEED)
    bank = MeterBank(scn, clock, port=free_port())
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=1.0)
    try:
        drv = MeterDriver(f"pm-{name}", 3, prof, bus, clock, timeout_s=1.0, quantities=tuple(prof.points))
        t0 = bank.sim_time()
        r = await drv.poll()
        t1 = bank.sim_time()
        assert r.ok, r.error
        assert set(r.values) == set(prof.points) and not r.bad, (sorted(r.values), r.bad)
        assert bank.refused_strict == (len(drv.learned) if strict else 0)
        if strict:  # what the meter read is its runs of adjacent points, nothing across a gap
            assert not any(b.gaps for b in drv.blocks)
        truth = truth_range(machine, t0, t1)
        for q, v in r.values.items():
            lo, hi = truth[q]
            # One register step either side (rounding, counter flooring, float spacing) plus a
            # relative 1e-9 for the float arithmetic of the truth itself.
            tol = point_step(prof, q, hi) + 1e-9 * max(abs(lo), abs(hi))
            assert lo - tol <= v <= hi + tol, f"{name}: {q} = {v!r}, the meter showed {lo!r}..{hi!r} (tolerance {tol:g})"
    finally:
        await bus.close()
        await bank.stop()
