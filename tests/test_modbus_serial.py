"""Modbus RTU on a serial line: the simulator on one end of a socat pseudo-terminal pair, the
agent's bus on the other; several meters share the line and its lock."""

import asyncio
import os
import shutil
import signal
import subprocess
import time

import pytest

from energy_agent.core.clock import Clock
from energy_agent.drivers.config import SerialLine
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import load_profile
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_SCENARIO

DEMO = scn.load(DEMO_SCENARIO)


@pytest.fixture
def pty_pair(tmp_path):
    socat = shutil.which("socat")
    assert socat, "socat not found: install the Debian package 'socat' (make test does)"
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 10
    while not (a.exists() and b.exists()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "socat did not create the pty pair"
        time.sleep(0.02)
    yield str(a), str(b)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(5)


async def test_meters_share_one_rtu_line_and_recover_after_a_silent_meter(pty_pair):
    agent_end, sim_end = pty_pair
    speed = 20.0
    clock = Clock(speed=speed, anchor=time.time() - 300.0 / speed)
    # m1 goes silent for 0.8 real seconds, starting 1 real second from now.
    silent = {"machine": "m1", "kind": "meter_silent", "from_s": 300.0 + speed, "to_s": 300.0 + 1.8 * speed}
    scenario = scn.Scenario.model_validate({**DEMO.model_dump(), "faults": [silent]})
    bank = MeterBank(scenario, clock, serial_device=sim_end, baudrate=19200)
    await bank.start()
    bus = ModbusBus("", 0, timeout_s=0.5, serial=SerialLine(device=agent_end, baudrate=19200))
    try:
        drivers = [MeterDriver(f"pm-{m.id}", m.meter.unit_id, load_profile(m.meter.profile), bus, clock,
                               timeout_s=0.5, retries=0, pause_s=0.02) for m in DEMO.machines]
        for _ in range(2):
            for drv, m in zip(drivers, DEMO.machines):
                t0 = bank.sim_time()
                r = await drv.poll()
                t1 = bank.sim_time()
                assert r.ok, r.error
                tl = DEMO.timelines[m.id]
                assert tl.counter_kwh(t0) - 0.002 <= r.values["energy_import_kwh"] <= tl.counter_kwh(t1) + 0.002
        # A unit that is not on the line: the simulator answers exception code 4.
        ghost = MeterDriver("pm-ghost", 9, load_profile("eastron-sdm630"), bus, clock, timeout_s=0.3, retries=0)
        r = await ghost.poll()
        assert not r.ok and "unit 9: exception code 4" in r.error
        # m1 falls silent: its request times out (and holds the line, as on RS-485) ...
        while bank.sim_time() < silent["from_s"]:
            await asyncio.sleep(0.02)
        r = await drivers[0].poll()
        assert not r.ok and "no answer within 0.5 s" in r.error and "rtu://" in r.error
        # ... and once it speaks again both meters read normally on a fresh connection.
        while bank.sim_time() < silent["to_s"] + 0.2 * speed:
            await asyncio.sleep(0.02)
        assert all([(await d.poll()).ok for d in drivers])
    finally:
        await bus.close()
        await bank.stop()


def test_rtu_config_needs_a_serial_line():
    from energy_agent.drivers.config import MeterDevice

    with pytest.raises(ValueError, match="transport rtu needs serial"):
        MeterDevice(id="pm", transport="rtu", profile="eastron-sdm630")
    with pytest.raises(ValueError, match="transport tcp needs host"):
        MeterDevice(id="pm", profile="eastron-sdm630")
    dev = MeterDevice(id="pm", transport="rtu", profile="eastron-sdm630", serial={"device": "/dev/ttyUSB0"})
    assert dev.bus_key() == ("rtu", "/dev/ttyUSB0")
