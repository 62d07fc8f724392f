"""The Modbus meter driver against the simulated meters (TCP and RTU-over-TCP) and dead peers."""

import time

import numpy as np
import pytest

from energy_agent.core.clock import Clock
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import load_profile
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)


@pytest.mark.parametrize("framer", ["tcp", "rtu-over-tcp"])
async def test_driver_reads_both_profiles_over_one_bus(framer):
    clock = Clock(speed=20.0, anchor=time.time() - 300.0 / 20.0)  # scenario time 300 s: both machines busy
    bank = MeterBank(DEMO, clock, port=free_port(), framer=framer)
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, framer=framer, timeout_s=1.0)
    try:
        for m in DEMO.machines:
            prof = load_profile(m.meter.profile)
            drv = MeterDriver(f"pm-{m.id}", m.meter.unit_id, prof, bus, clock, timeout_s=1.0)
            # SDM630: power (30053) and energy (30073) in two requests (the meter refuses one across
            # the unmapped registers between them); iEM3000: 3060 and 3204 are 144 registers apart,
            # more than one request may carry (125): two requests.
            assert len(drv.blocks) == {"eastron-sdm630": 2, "schneider-iem3000": 2}[prof.name]
            requests = bank.requests
            t0 = bank.sim_time()
            r = await drv.poll()
            t1 = bank.sim_time()
            assert r.ok and bank.requests == requests + len(drv.blocks), r.error
            tl = DEMO.timelines[m.id]
            step = prof.counter_step_kwh() or float(np.spacing(np.float32(tl.counter_kwh(t1))))
            assert tl.counter_kwh(t0) - step <= r.values["energy_import_kwh"] <= tl.counter_kwh(t1) + step
            assert min(tl.power_at(t0), tl.power_at(t1)) - 2 <= r.values["power_w"] <= max(tl.power_at(t0), tl.power_at(t1)) + 2
            # The reading is stamped between the request's start and end on the scenario clock.
            assert clock.anchor + t0 - 1e-3 <= r.wall <= clock.anchor + t1 + 1e-3
    finally:
        await bus.close()
        await bank.stop()


async def test_unknown_unit_and_dead_gateway_become_reading_errors():
    clock = Clock()
    bank = MeterBank(DEMO, clock, port=free_port())
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=0.5)
    try:
        drv = MeterDriver("pm-x", 9, load_profile("eastron-sdm630"), bus, clock, timeout_s=0.5, retries=0)
        r = await drv.poll()
        assert not r.ok and "unit 9: exception code 4" in r.error
    finally:
        await bus.close()
        await bank.stop()
    dead = ModbusBus("127.0.0.1", free_port(), timeout_s=0.3, backoff_min_s=5.0)
    drv = MeterDriver("pm-y", 1, load_profile("eastron-sdm630"), dead, clock, timeout_s=0.3, retries=0)
    r = await drv.poll()
    assert not r.ok and "cannot connect" in r.error
    started = time.monotonic()
    r = await drv.poll()  # inside the backoff: no new connection attempt, an immediate error
    assert not r.ok and "next attempt in" in r.error and time.monotonic() - started < 0.1
    await dead.close()
