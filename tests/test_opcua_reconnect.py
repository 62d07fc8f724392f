"""The OPC UA driver survives a server restart: one warning, one recovery line, data again."""

import asyncio
import logging
import time

from energy_agent.core.clock import Clock
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.opcua import CncDriver
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_driver_reconnects_and_resubscribes_after_server_restart(caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.opcua")
    speed = 20.0
    # J-1001 starts at scenario 160 s = 8 s real from now: time for the server to start (~2 s,
    # more on a loaded machine), the first snapshot, the stop and noticing it, all before it.
    clock = Clock(speed=speed, anchor=time.time())
    port = free_port()
    nm = load_nodemap("opc40502")
    ids = nm.resolve({"namespace": DEMO.namespace, "channel": "M1.Channel_1", "job": "M1.Job"})
    readings = []
    driver = CncDriver("cnc-1", f"opc.tcp://127.0.0.1:{port}", nm, ids, clock, readings.append,
                       interval_s=0.1 * speed, timeout_s=1.0, backoff_min_s=0.2, backoff_max_s=0.5)
    stop = asyncio.Event()
    bank = CncBank(DEMO, clock, port=port)
    await bank.start()
    task = asyncio.create_task(driver.run(stop))
    try:
        await _until(lambda: driver.available and readings, 10, "first snapshot")
        await bank.stop()  # the CNC goes away ...
        await _until(lambda: not driver.available, 10, "the outage to be noticed")
        while clock.wall() < clock.anchor + 165.0:  # ... while J-1001 starts (scenario 160 s)
            await asyncio.sleep(0.02)
        n_errors = sum(1 for r in readings if not r.ok)
        bank = CncBank(DEMO, clock, port=port)  # and comes back on the same endpoint
        await bank.start()
        await _until(lambda: driver.available, 15, "reconnection")
        # J-1001 starts at scenario 160 s, while the server is down; after the restart it must show.
        await _until(lambda: any(r.ok and r.values.get("job_id") == "J-1001" for r in readings), 15, "J-1001")
    finally:
        stop.set()
        await task
        await bank.stop()
    assert n_errors == 1  # one error reading for the outage, not one per attempt
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.message]
    backs = [r for r in caplog.records if "back after" in r.message]
    assert len(warnings) == 1 and len(backs) == 1
    # J-1001 started (scenario 160 s) while the server was down: the first snapshot after the
    # reconnection shows it as the server's state, stamped at its receipt (not at the start's
    # instant, which would replay the outage value by value), with the start's instant in stamps.
    k = next(k for k, r in enumerate(readings) if not r.ok)
    again = readings[k + 1]
    assert again.initial and again.values["job_id"] == "J-1001" and again.wall >= clock.anchor + 165.0
    assert abs(again.stamps["job_id"] - (clock.anchor + 160.0)) < 1e-3
