"""Simulators: closed-form truth, registers as a real client reads them, CNC values, faults."""

import asyncio
import math
import time
from datetime import timezone

import numpy as np
import pytest
from asyncua import Client
from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient

from agent.clock import Clock
from agent.errors import ConfigError
from drivers import codec
from drivers.profile import decode_block, load_profile, plan_blocks
from simulators import scenario as scn
from simulators.cnc import CncBank
from simulators.meter import MeterBank
from simulators.plant import DEMO_SCENARIO
from simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)


def test_closed_form_energy_matches_numeric_integration():
    tl = DEMO.timelines["m1"]
    a, b = 100.0, 900.0
    t = np.linspace(a, b, 800_001)
    p = np.array([tl.power_at(x) for x in t])
    numeric = float(np.sum((p[1:] + p[:-1]) * np.diff(t)) / 2)
    closed = sum(tl.energy_ws(a, b).values())
    # Trapezoid on a 1 ms grid: the steps at state changes fall between grid points and cost at
    # most dP * dt per change (here < 10 kW * 1 ms = 10 J each, 6 changes), the ripple's
    # curvature far less. The closed form must agree within that.
    assert abs(numeric - closed) < 60.0
    assert closed > 0


def test_truth_is_per_job_and_adds_up_by_state():
    truth = scn.truth(DEMO)
    assert len(truth) == 8
    for j in truth:
        assert j["kwh"] == pytest.approx(sum(j["by_state"].values()), rel=1e-12)
        tl = DEMO.timelines[j["machine"]]
        assert j["counter_end_kwh"] - tl.counter_kwh(j["start_s"]) == pytest.approx(j["kwh"], abs=1e-9)
    j1003 = next(j for j in truth if j["job_id"] == "J-1003")
    assert j1003["by_state"]["interrupted"] > 0 and j1003["by_state"]["ready"] == 0


def test_cnc_values_follow_the_timeline():
    tl = DEMO.timelines["m1"]
    before = tl.cnc_values(100.0)
    assert (before["channel_status"], before["job_id"], before["parts_total"], before["program"]) == (2, "", 0, "")
    setup = tl.cnc_values(170.0)
    assert (setup["channel_status"], setup["operation_mode"], setup["job_id"]) == (0, 2, "J-1001")
    proc = tl.cnc_values(300.0)
    assert (proc["program_status"], proc["serial"]) == (1, "SN-0001")
    at_boundary = tl.cnc_values(460.0)  # J-1001 ends and J-1002 starts at the same instant
    assert (at_boundary["job_id"], at_boundary["parts_total"], at_boundary["serial"]) == ("J-1002", 1, "SN-0002")


@pytest.mark.parametrize("patch, message", [
    ({"speed": 0}, "speed"),
    ({"machines": [{"id": "m1", "meter": {"unit_id": 1, "profile": "eastron-sdm630"},
                    "cnc": {"channel": "c", "job": "j"}, "power_w": {"ready": 1, "processing": 5},
                    "jobs": [{"job_id": "A", "program": "P", "start_s": 0, "phases": [["processing", 10]]},
                             {"job_id": "B", "program": "P", "start_s": 5, "phases": [["processing", 10]]}]}]},
     "machines[0].jobs[1].start_s: B starts at 5 s, before job A ends at 10 s"),
    ({"faults": [{"machine": "m9", "kind": "power_nan", "from_s": 1, "to_s": 2}]},
     "faults[0].machine: unknown machine 'm9'"),
])
def test_scenario_errors_name_the_field(tmp_path, patch, message):
    import yaml

    data = yaml.safe_load(DEMO_SCENARIO.read_text())
    data.update(patch)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        scn.load(path)


def _scenario_with_faults(faults):
    data = DEMO.model_dump()
    data["faults"] = faults
    return scn.Scenario.model_validate(data)


@pytest.fixture
async def meters(request):
    faults, framer = getattr(request, "param", ([], "tcp"))
    s = _scenario_with_faults(faults)
    clock = Clock(speed=50.0, anchor=time.time() - 200.0 / 50.0)  # scenario time 200 s now
    bank = MeterBank(s, clock, port=free_port(), framer=framer)
    await bank.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=bank.port, timeout=0.5, retries=0,
                                  framer=FramerType.SOCKET if framer == "tcp" else FramerType.RTU)
    await client.connect()
    yield s, bank, client
    client.close()
    await bank.stop()


async def _read(client, unit, profile, quantities):
    prof = load_profile(profile)
    values = {}
    for block in plan_blocks(prof, quantities):
        call = client.read_input_registers if block.function == "input" else client.read_holding_registers
        rr = await call(block.start, count=block.count, device_id=unit)
        assert not rr.isError(), rr
        values.update(decode_block(prof, block, rr.registers))
    return values


@pytest.mark.parametrize("meters", [([], "tcp"), ([], "rtu-over-tcp")], indirect=True)
async def test_registers_decode_to_the_timeline(meters):
    s, bank, client = meters
    for m, unit in (("m1", 1), ("m2", 2)):
        profile = s.machines[unit - 1].meter.profile
        tl = s.timelines[m]
        t0 = bank.sim_time()
        v = await _read(client, unit, profile, ["power_w", "energy_import_kwh", "voltage_l1_v"])
        t1 = bank.sim_time()
        # The registers were computed at some instant in [t0, t1]: energy lies between the
        # counter at t0 and at t1 (widened by one register step); power likewise.
        step = load_profile(profile).counter_step_kwh() or float(np.spacing(np.float32(tl.counter_kwh(t1))))
        assert tl.counter_kwh(t0) - step <= v["energy_import_kwh"] <= tl.counter_kwh(t1) + step
        lo, hi = sorted((tl.power_at(t0), tl.power_at(t1)))
        assert lo - 2.0 <= v["power_w"] <= hi + 2.0
        assert v["voltage_l1_v"] == pytest.approx(230.0)


@pytest.mark.parametrize("meters", [([{"machine": "m1", "kind": "modbus_exception", "from_s": 0, "to_s": 10_000}],
                                     "tcp")], indirect=True)
async def test_fault_modbus_exception(meters):
    _, _, client = meters
    rr = await client.read_input_registers(52, count=2, device_id=1)
    assert rr.isError() and rr.exception_code == 4
    rr = await client.read_holding_registers(3203, count=4, device_id=2)  # other meters unaffected
    assert not rr.isError()


@pytest.mark.parametrize("meters", [([{"machine": "m2", "kind": "counter_reset", "from_s": 150},
                                      {"machine": "m2", "kind": "power_nan", "from_s": 0, "to_s": 10_000}],
                                     "tcp")], indirect=True)
async def test_fault_counter_reset_and_nan_power(meters):
    s, bank, client = meters
    v = await _read(client, 2, "schneider-iem3000", ["power_w", "energy_import_kwh"])
    tl = s.timelines["m2"]
    since_reset = tl.counter_kwh(bank.sim_time()) - tl.counter_kwh(150.0)
    assert 0.0 <= v["energy_import_kwh"] <= since_reset + 0.002  # restarted from zero at 150 s
    assert math.isnan(v["power_w"])


@pytest.mark.parametrize("meters", [([{"machine": "m1", "kind": "meter_silent", "from_s": 0, "to_s": 10_000}],
                                     "tcp")], indirect=True)
async def test_fault_meter_silent_times_out(meters):
    _, _, client = meters
    with pytest.raises(Exception):
        rr = await asyncio.wait_for(client.read_input_registers(52, count=2, device_id=1), 1.0)
        assert rr.isError()


async def test_cnc_server_publishes_changes_with_exact_source_timestamps():
    # J-1001 (m1) starts at scenario time 160 s: 1.2 s (real) from now at 50x. The server takes
    # ~2 s to start, so the job may already run when it comes up: either way the value must
    # carry the exact instant it changed.
    clock = Clock(speed=50.0, anchor=time.time() - 100.0 / 50.0)
    bank = CncBank(DEMO, clock, port=free_port())
    await bank.start()
    try:
        async with Client(bank.endpoint) as client:
            idx = await client.get_namespace_index(DEMO.namespace)
            job = client.get_node(f"ns={idx};s=M1.Job.Identifier")
            status = client.get_node(f"ns={idx};s=M1.Channel_1.ActStatus")
            deadline = time.monotonic() + 5
            while (await job.read_value()) != "J-1001":
                assert time.monotonic() < deadline, "J-1001 never started"
                await asyncio.sleep(0.02)
            dv = await job.read_data_value()
            stamp = dv.SourceTimestamp.replace(tzinfo=timezone.utc).timestamp()
            assert stamp == pytest.approx(clock.anchor + 160.0, abs=1e-6)  # the exact scenario instant
            assert (await status.read_value()) == 0
    finally:
        await bank.stop()
