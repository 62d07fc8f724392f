"""A bug is not an outage: an exception that no device or network can cause ends CncDriver.run
with itself, instead of being logged as "unavailable" and retried for ever."""

import asyncio
import logging
import time
from datetime import datetime, timezone

import pytest

from energy_agent.core.clock import Clock
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.opcua import CncDriver
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)
SPEED = 20.0  # J-1001 starts at scenario 160 s: no change of the scenario's own during the test


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("good", [0, 1], ids=["initial-read", "publish-response"])
async def test_a_type_error_in_emit_ends_run_with_it_instead_of_an_outage(caplog, good):
    """``emit`` takes ``good`` snapshots, then raises TypeError: on the snapshot of the first
    Read, or on the first one a publish response brings (a node written once subscribed). The
    run must end with that TypeError, at once, without an "unavailable" warning."""
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.opcua")
    clock = Clock(speed=SPEED, anchor=time.time())
    nm = load_nodemap("opc40502")
    ids = nm.resolve({"namespace": DEMO.namespace, "channel": "M1.Channel_1", "job": "M1.Job"})
    readings = []

    def emit(reading):  # an error reading (of an outage) passes: the driver could go on retrying
        if reading.ok and len(readings) == good:
            raise TypeError("a bug in the caller's callback")
        readings.append(reading)

    bank = CncBank(DEMO, clock, port=free_port())
    await bank.start()
    driver = CncDriver("cnc-1", bank.endpoint, nm, ids, clock, emit, interval_s=0.1 * SPEED, timeout_s=2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    try:
        if good:
            await _until(lambda: driver.subscribed or task.done(), 15, "the subscription")
            assert not task.done(), task
            await bank._write("m1", "parts_total", 99, datetime.now(timezone.utc))
        with pytest.raises(TypeError, match="a bug in the caller's callback"):
            await asyncio.wait_for(asyncio.shield(task), 10)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await bank.stop()
    assert len(readings) == good and all(r.ok for r in readings)
    assert not [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
