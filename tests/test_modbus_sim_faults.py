"""The meter simulator's strict gaps, listener drops and frozen counters, as a plain pymodbus
client and the agent's driver see them."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from energy_agent.core.errors import ConfigError
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import load_profile
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)
ANCHOR = 1_790_000_000.0


class ManualClock:
    """Scenario time set by the test."""

    def __init__(self, t: float):
        self.anchor, self.t, self.speed = ANCHOR, t, 1.0

    def wall(self) -> float:
        return self.anchor + self.t

    def mono(self) -> float:
        return self.t

    def wall_of_mono(self, mono: float) -> float:
        return self.anchor + mono


def strict_demo(strict: bool) -> scn.Scenario:
    data = DEMO.model_dump()
    for m in data["machines"]:
        m["meter"]["strict"] = strict
    return scn.Scenario.model_validate(data)


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("strict", [False, True])
async def test_strict_meter_refuses_reads_touching_unmapped_registers(strict):
    bank = MeterBank(strict_demo(strict), ManualClock(300.0), port=0)
    await bank.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=bank.port, timeout=1.0, retries=0)
    assert await client.connect()
    try:
        across = await client.read_input_registers(52, count=22, device_id=1)   # 30053..30074: gaps at 54..61, ...
        alone = await client.read_input_registers(52, count=2, device_id=1)      # power
        run = await client.read_input_registers(70, count=6, device_id=1)        # frequency, import, export
        inside = await client.read_input_registers(53, count=1, device_id=1)     # power's low word: mapped
        gap = await client.read_input_registers(54, count=2, device_id=1)        # 30055: unmapped
        assert not alone.isError() and not run.isError() and not inside.isError()
        assert across.isError() is strict and gap.isError() is strict
        if strict:
            assert across.exception_code == gap.exception_code == 2
            assert bank.refused_strict == 2
        else:
            assert across.registers[:2] == alone.registers and bank.refused_strict == 0
        # the other meter (iEM3000, holding registers) follows the same rule
        rr = await client.read_holding_registers(2999, count=34, device_id=2)   # currents .. voltages, gap 3005..3026
        assert rr.isError() is strict
    finally:
        client.close()
        await bank.stop()


async def test_counter_freeze_holds_the_register_while_power_reads():
    s = DEMO.with_faults([{"machine": "m1", "kind": "counter_freeze", "from_s": 300, "to_s": 400}])
    m1 = s.machine("m1")
    clock = ManualClock(250.0)
    bank = MeterBank(s, clock, port=0)
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=1.0)
    drv = MeterDriver("pm-1", 1, load_profile("eastron-sdm630"), bus, clock, timeout_s=1.0)
    try:
        seen = {}
        for t in (250.0, 300.0, 350.0, 399.0, 400.0, 450.0):
            clock.t = t
            r = await drv.poll()
            assert r.ok, r.error
            seen[t] = r.values
            assert r.values["power_w"] == float(np.float32(scn.power_at(m1, t)))  # power keeps reading
        frozen = float(np.float32(scn.energy_at(m1, 300.0)))
        assert [seen[t]["energy_import_kwh"] for t in (300.0, 350.0, 399.0)] == [frozen] * 3
        for t in (250.0, 400.0, 450.0):  # before, and from to_s on: the true register again
            assert seen[t]["energy_import_kwh"] == float(np.float32(scn.energy_at(m1, t)))
        assert scn.energy_at(m1, 399.0) - scn.energy_at(m1, 300.0) > 0.1  # the machine did use energy meanwhile
    finally:
        await bus.close()
        await bank.stop()
    # The truth names the freeze for the job it touches, with the energy the register missed.
    (job,) = [j for j in scn.truth(s) if j["machine"] == "m1" and j["start_s"] <= 300.0 < j["end_s"]]
    (fault,) = job["faults"]
    assert fault["kind"] == "counter_freeze" and (fault["from_s"], fault["to_s"]) == (300.0, 400.0)
    assert fault["energy_kwh"] == pytest.approx(scn.energy_at(m1, 400.0) - scn.energy_at(m1, 300.0), rel=1e-9)


async def test_listener_down_drops_connections_refuses_new_ones_and_comes_back_on_the_same_port():
    s = DEMO.with_faults([{"machine": "m1", "kind": "listener_down", "from_s": 300, "to_s": 310}])
    clock = ManualClock(290.0)
    bank = MeterBank(s, clock, port=0)
    await bank.start()
    port = bank.port
    bus = ModbusBus("127.0.0.1", port, timeout_s=0.5, backoff_min_s=0.05, backoff_max_s=0.2)
    drivers = [MeterDriver(f"pm-{m.id}", m.meter.unit_id, load_profile(m.meter.profile), bus, clock,
                           timeout_s=0.5, retries=0) for m in s.machines]
    try:
        assert all([(await d.poll()).ok for d in drivers])
        clock.t = 300.0
        await until(lambda: not bank.listening)
        # The open connection was dropped (a request crossing the drop times out), a new one is
        # refused: both meters are gone.
        errors = [(await d.poll()).error for d in drivers for _ in range(2)]
        assert all(errors) and "cannot connect" in errors[-1], errors
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
        assert not await client.connect()
        client.close()
        clock.t = 310.0
        await until(lambda: bank.listening)
        assert bank.port == port and bank.listener_changes == 2

        async def both_back() -> bool:
            return all([(await d.poll()).ok for d in drivers])
        deadline = time.monotonic() + 5.0
        while not await both_back():  # within the bus's backoff (0.2 s at most)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await bus.close()
        await bank.stop()
    # Every meter on the port was gone: the truth lists the fault for both machines' jobs.
    touched = {j["machine"] for j in scn.truth(s) if any(f["kind"] == "listener_down" for f in j["faults"])}
    assert touched == {"m1", "m2"}


def test_new_fault_kinds_are_validated():
    with pytest.raises(ConfigError, match="faults.0..to_s: listener_down needs an end"):
        scn.parse({**DEMO.model_dump(), "faults": [{"machine": "m1", "kind": "listener_down", "from_s": 5}]})
    with pytest.raises(ConfigError, match="counter_freeze needs an end"):
        scn.parse({**DEMO.model_dump(), "faults": [{"machine": "m1", "kind": "counter_freeze", "from_s": 5}]})
    s = DEMO.with_faults([{"machine": "m1", "kind": "listener_down", "from_s": 5, "to_s": 6}])
    with pytest.raises(ValueError, match="listener_down faults .m1. need a TCP port"):
        MeterBank(s, ManualClock(0.0), serial_device="/dev/null")


async def test_a_bank_started_inside_a_listener_down_window_binds_its_port_and_waits():
    s = DEMO.with_faults([{"machine": "m2", "kind": "listener_down", "from_s": 0, "to_s": 10}])
    clock = ManualClock(5.0)
    port = free_port()
    bank = MeterBank(s, clock, port=port)
    await bank.start()
    try:
        assert not bank.listening and bank.port == port
        clock.t = 10.0
        await until(lambda: bank.listening)
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
        assert await client.connect()
        assert not (await client.read_input_registers(72, count=2, device_id=1)).isError()
        client.close()
    finally:
        await bank.stop()
