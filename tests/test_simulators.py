"""Simulators: closed-form truth, registers as a real client reads them, CNC values and their
SourceTimestamps over OPC UA, faults, scenario validation, the ``simulate`` command.

Most server tests drive the simulators with a *manual* clock (scenario time set by the test),
so register values and OPC UA timestamps can be compared exactly with the closed form; one
meter test and the command test run on the real scaled :class:`Clock`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml
from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent
from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient

from energy_agent.core.clock import Clock
from energy_agent.core.errors import ConfigError
from energy_agent.core.states import CODE, STATES
from energy_agent.drivers import codec
from energy_agent.drivers.profile import decode_block, load_profile, plan_blocks
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.meter import MeterBank, encode_value, meter_values
from energy_agent.simulators.serve import READY, serve
from tests.factories import until

ROOT = Path(__file__).resolve().parents[1]
DEMO_PATH = ROOT / "simulators" / "scenarios" / "demo.yaml"
DEMO = scn.load(DEMO_PATH)
ANCHOR = 1_790_000_000.125  # a wall instant with an exact microsecond value


class ManualClock:
    """Duck-typed :class:`Clock` whose scenario time the test sets."""

    def __init__(self, t: float = 0.0, anchor: float = ANCHOR):
        self.anchor, self.t, self.speed = anchor, t, 1.0

    def wall(self) -> float:
        return self.anchor + self.t

    def real_seconds(self, seconds: float) -> float:
        return seconds


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


# ---------------------------------------------------------------------------- closed form


def test_closed_form_matches_fine_numeric_integration():
    # Midpoint rule on a 1/256 s grid from -64 s (before the anchor) to past the end. Every
    # state change is at a whole second, so on a grid point: no cell straddles a step, and the
    # only error is the ripple's curvature, at most (b - a) dt^2 / 24 * max|P''| with
    # |P''| <= P a w^2 (about 0.05 W s here, against ~10^7 W s). Tolerance: that bound + 1e-3 W s
    # for summation rounding.
    dt = 1.0 / 256
    a, b = -64.0, DEMO.duration_s + 64.0
    mid = a + dt * (np.arange(int((b - a) / dt)) + 0.5)
    for m in DEMO.machines:
        r = m.meter.ripple
        bound = (b - a) * dt**2 / 24 * max(m.power_w.values()) * r.amplitude * (2 * math.pi / r.period_s) ** 2 + 1e-3
        p = scn.power_at(m, mid)
        codes = m.timeline.state_code_at(mid)
        numeric = float(np.sum(p) * dt)
        closed = (scn.energy_at(m, b) - scn.energy_at(m, a)) * scn.J_PER_KWH
        assert abs(numeric - closed) <= bound, (m.id, numeric - closed, bound)
        by_state = m.timeline.energy_ws(a, b)
        for s in STATES:
            assert abs(float(np.sum(p[codes == CODE[s]]) * dt) - by_state[s]) <= bound, (m.id, s)
        # per job window, against the truth
        for j in (j for j in scn.truth(DEMO) if j["machine"] == m.id):
            sel = (mid >= j["start_s"]) & (mid < j["end_s"])
            assert abs(float(np.sum(p[sel]) * dt) - j["kwh"] * scn.J_PER_KWH) <= bound, j["job_id"]
        # the cumulative form (energy_at) and the segment sums agree; energy_at is vectorised
        ts = np.array([-500.0, -0.5, 0.0, 161.25, 459.999, 460.0, 1234.5, 5000.0])
        assert np.array_equal(scn.energy_at(m, ts), [scn.energy_at(m, float(t)) for t in ts])
        for t0, t1 in zip(ts, ts[1:]):
            seg = sum(m.timeline.energy_ws(float(t0), float(t1)).values()) / scn.J_PER_KWH
            assert scn.energy_at(m, float(t1)) - scn.energy_at(m, float(t0)) == pytest.approx(seg, abs=1e-9)
        assert scn.energy_at(m, 0.0) == m.meter.energy_offset_kwh
        assert scn.energy_at(m, -100.0) < m.meter.energy_offset_kwh  # defined before the anchor


def test_power_state_and_job_follow_the_timeline():
    m1 = DEMO.machine("m1")
    r = m1.meter.ripple
    assert scn.state_at(m1, 0.0) == "ready" and scn.job_at(m1, 0.0) is None
    ripple = r.amplitude * math.sin(2 * math.pi * 10 / r.period_s + r.phase)
    assert scn.power_at(m1, 10.0) == pytest.approx(1200 * (1 + ripple))
    # right-continuous: a boundary belongs to what starts there; back to back J-1001 -> J-1002 at 460
    assert scn.state_at(m1, 160.0) == "setup" and scn.job_at(m1, 160.0).job_id == "J-1001"
    assert scn.job_at(m1, 459.999).job_id == "J-1001" and scn.job_at(m1, 460.0).job_id == "J-1002"
    assert scn.state_at(m1, 670.0) == "ready" and scn.job_at(m1, 670.0) is None
    assert list(scn.state_at(m1, np.array([0.0, 170.0, 1100.0]))) == ["ready", "setup", "interrupted"]
    assert scn.power_at(m1, np.array([1.0, 2.0])).shape == (2,)


def test_truth_per_job_adds_up_and_ignores_faults():
    truth = scn.truth(DEMO)
    assert len(truth) == 8 and {j["machine"] for j in truth} == {"m1", "m2"}
    for j in truth:
        assert j["kwh"] == pytest.approx(sum(j["by_state"].values()), rel=1e-12)
        assert j["counter_end_kwh"] - j["counter_start_kwh"] == pytest.approx(j["kwh"], abs=1e-9)
        assert j["end_s"] - j["start_s"] == j["duration_s"] >= 60
        assert j["by_state"]["ready"] == 0.0
        assert j["kwh"] > 0.1  # far above both counters' resolution (f32 ~1 Wh at 12 MWh; 1 Wh)
    by_id = {j["job_id"]: j for j in truth}
    assert by_id["J-1001"]["end_s"] == by_id["J-1002"]["start_s"]  # back to back
    assert by_id["J-1003"]["by_state"]["interrupted"] > 0
    faulted = DEMO.with_faults([{"machine": "m1", "kind": "counter_reset", "from_s": 300},
                                {"machine": "m2", "kind": "meter_silent", "from_s": 200, "to_s": 400}])
    energy = [{k: v for k, v in j.items() if k != "faults"} for j in scn.truth(faulted)]
    assert energy == [{k: v for k, v in j.items() if k != "faults"} for j in truth]  # reports change, not energy
    named = {j["job_id"]: [f["kind"] for f in j["faults"]] for j in scn.truth(faulted)}
    assert named["J-1001"] == ["counter_reset"] and named["J-2001"] == ["meter_silent"] and named["J-1002"] == []


def test_cnc_changes_follow_the_timeline():
    tl = DEMO.machine("m1").timeline
    changes = dict(tl.cnc_changes)
    assert changes[-math.inf] == {"channel_status": 2, "program_status": 0, "operation_mode": 0, "program": "",
                                  "job_id": "", "parts_total": 0, "product": "", "serial": "", "subassembly": ""}
    assert changes[160.0] == {"channel_status": 0, "operation_mode": 2, "program": "O1001", "job_id": "J-1001",
                              "product": "SPU-40", "serial": "SN-0001", "subassembly": "spindle-housing"}
    assert changes[220.0] == {"program_status": 1, "operation_mode": 0}
    # back to back: the job ends and the next starts in one change (parts counted at the end)
    assert changes[460.0] == {"job_id": "J-1002", "parts_total": 1, "serial": "SN-0002"}
    # job end: idle, job id cleared, parts counted, program and product kept
    assert changes[670.0] == {"channel_status": 2, "program_status": 0, "job_id": "", "parts_total": 2}
    assert changes[1085.0] == {"channel_status": 1, "program_status": 3}  # interrupted
    v = tl.cnc_values(700.0)
    assert (v["program"], v["serial"], v["job_id"], v["parts_total"]) == ("O1001", "SN-0002", "", 2)


# ---------------------------------------------------------------------------- validation


def _demo_data() -> dict:
    return yaml.safe_load(DEMO_PATH.read_text())


def _job(job_id, start, phases):
    return {"job_id": job_id, "program": "P", "start_s": start, "phases": phases}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(speed=0), "speed: Input should be greater than 0"),
    (lambda d: d["machines"][1]["jobs"].append(_job("J-X", 1000, [["processing", 60]])),
     "machines[1].jobs[4].start_s: overlaps job J-2003"),
    (lambda d: d["machines"][0]["jobs"].insert(0, _job("J-X", 100, [["processing", 100]])),
     "machines[0].jobs[1].start_s: overlaps job J-X"),
    (lambda d: d["machines"][0]["jobs"][2]["phases"].append(["ready", 10]),
     "machines[0].jobs[2].phases[4]: 'ready' is not a job state"),
    (lambda d: d["machines"][0]["jobs"][0]["phases"].append(["milling", 10]),
     "machines[0].jobs[0].phases[2]: 'milling' is not an operating state"),
    (lambda d: d["machines"][1]["jobs"][0].update(job_id="J-2002"),
     "machines[1].jobs[1].job_id: 'J-2002' already used by jobs[0]"),
    (lambda d: d["machines"][1].update(id="m1"), "machines[1].id: duplicate machine 'm1'"),
    (lambda d: d["machines"][1]["meter"].update(unit_id=1), "machines[1].meter.unit_id: unit 1 already used"),
    (lambda d: d["machines"][0]["meter"].update(profile="no-such-meter"),
     "machines[0].meter.profile: meter profile 'no-such-meter' not found"),
    (lambda d: d["machines"][0]["power_w"].pop("setup"), "machines[0].power_w: no power for states setup"),
    (lambda d: d["machines"][0]["meter"].update(colour="red"), "machines[0].meter.colour: Extra inputs"),
    (lambda d: d.update(duration_s=1400), "machines[0].jobs[3].start_s: job J-1004 ends at 1415 s, after the scenario"),
    (lambda d: d.update(faults=[{"machine": "m9", "kind": "power_nan", "from_s": 1, "to_s": 2}]),
     "faults[0].machine: unknown machine 'm9'"),
    (lambda d: d.update(faults=[{"machine": "m1", "kind": "meter_on_fire", "from_s": 1}]),
     "faults[0].kind: unknown fault kind 'meter_on_fire' (known: meter_silent, modbus_exception"),
    (lambda d: d.update(faults=[{"machine": "m1", "kind": "meter_silent", "from_s": 1}]),
     "faults[0].to_s: meter_silent needs an end"),
    (lambda d: d.update(faults=[{"machine": "m1", "kind": "counter_reset", "from_s": 1, "to_s": 5}]),
     "faults[0].to_s: counter_reset happens at from_s and takes no to_s"),
    (lambda d: d.update(faults=[{"machine": "m1", "kind": "power_nan", "from_s": 5, "to_s": 5}]),
     "faults[0].to_s: 5 is not after from_s 5"),
    (lambda d: d.update(faults=[{"machine": "m1", "kind": "modbus_exception", "from_s": 1, "to_s": 5, "code": 9}]),
     "faults[0].code: 9 is not a Modbus exception code"),
])
def test_scenario_errors_name_the_field(tmp_path, edit, message):
    data = _demo_data()
    edit(data)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        scn.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_back_to_back_and_unsorted_jobs_are_valid():
    data = _demo_data()
    jobs = data["machines"][0]["jobs"]
    data["machines"][0]["jobs"] = [jobs[1], jobs[0], jobs[3], jobs[2]]  # listed out of order
    s = scn.parse(data)
    assert [j["job_id"] for j in scn.truth(s) if j["machine"] == "m1"] == ["J-1001", "J-1002", "J-1003", "J-1004"]
    assert scn.truth(s) == scn.truth(DEMO)


# ---------------------------------------------------------------------------- meters


@asynccontextmanager
async def meter_server(scenario, clock, framer="tcp", timeout=0.3):
    bank = MeterBank(scenario, clock, port=0, framer=framer)
    await bank.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=bank.port, timeout=timeout, retries=0,
                                  framer=FramerType.SOCKET if framer == "tcp" else FramerType.RTU)
    assert await client.connect()
    try:
        yield bank, client
    finally:
        client.close()
        await bank.stop()


async def read_profile(client, unit, profile_name, quantities=None):
    prof = load_profile(profile_name)
    values = {}
    for block in plan_blocks(prof, quantities):
        call = client.read_input_registers if block.function == "input" else client.read_holding_registers
        rr = await call(block.start, count=block.count, device_id=unit)
        assert not rr.isError(), (unit, block, rr)
        values.update(decode_block(prof, block, rr.registers))
    return values


@pytest.mark.parametrize("framer", ["tcp", "rtu-over-tcp"])
async def test_registers_decode_to_the_closed_form(framer):
    clock = ManualClock(t=300.0)  # both machines processing
    async with meter_server(DEMO, clock, framer) as (bank, client):
        for m in DEMO.machines:
            v = await read_profile(client, m.meter.unit_id, m.meter.profile)
            t = clock.t
            power, energy = scn.power_at(m, t), scn.energy_at(m, t)
            if m.meter.profile == "eastron-sdm630":  # float32 kWh: the nearest float32
                assert v["energy_import_kwh"] == float(np.float32(energy))
                assert v["power_w"] == float(np.float32(power))
            else:  # int64 Wh: floored to the Wh; power float32 in kW
                assert v["energy_import_kwh"] == pytest.approx(math.floor(energy * 1000) / 1000, abs=1e-12)
                assert v["power_w"] == pytest.approx(float(np.float32(power / 1000)) * 1000, rel=1e-12)
            assert v["energy_export_kwh"] == 0.0
            assert v["voltage_l1_v"] == v["voltage_l3_v"] == 230.0
            assert v["current_l2_a"] == pytest.approx(power / (3 * 230 * 0.9), rel=1e-6)
            assert v["power_factor"] == pytest.approx(0.9) and v["frequency_hz"] == 50.0
        # Request address vs the block's first register: address 52 (30053) is power itself,
        # whatever else the request covers, and 53 alone is its low word.
        words = encode_value(load_profile("eastron-sdm630").points["power_w"], scn.power_at(DEMO.machines[0], 300.0),
                             "big", "big", counter=False)
        rr = await client.read_input_registers(52, count=2, device_id=1)
        assert rr.registers == words
        rr = await client.read_input_registers(53, count=1, device_id=1)
        assert rr.registers == words[1:]
        rr = await client.read_holding_registers(3059, count=2, device_id=2)
        kw = codec.decode(rr.registers, "f32")
        assert kw * 1000 == pytest.approx(scn.power_at(DEMO.machines[1], 300.0), rel=1e-6)
        # Like a real meter: unmapped function, outside the map, writes -> illegal address (2)
        for rr in (await client.read_holding_registers(52, count=2, device_id=1),
                   await client.read_input_registers(76, count=2, device_id=1),
                   await client.read_input_registers(3059, count=2, device_id=2),
                   await client.write_register(52, 1, device_id=1)):
            assert rr.isError() and rr.exception_code == 2, rr
        # the registers follow the clock at request time
        clock.t = 460.0
        v = await read_profile(client, 2, "schneider-iem3000", ["energy_import_kwh"])
        assert v["energy_import_kwh"] == pytest.approx(math.floor(scn.energy_at(DEMO.machines[1], 460.0) * 1000) / 1000,
                                                       abs=1e-12)
        assert bank.requests > 0


async def test_registers_follow_the_scaled_clock():
    clock = Clock(speed=50.0, anchor=time.time() - 300.0 / 50.0)  # scenario time 300 s now, 50x
    async with meter_server(DEMO, clock, timeout=1.0) as (bank, client):
        for m in DEMO.machines:
            prof = load_profile(m.meter.profile)
            t0 = bank.sim_time()
            v = await read_profile(client, m.meter.unit_id, m.meter.profile, ["power_w", "energy_import_kwh"])
            t1 = bank.sim_time()
            # Served at some instant in [t0, t1] (each block of a profile at its own): the energy
            # register lies between the counter at t0 and at t1, widened by one register step
            # (1 Wh; float32 spacing for the SDM630); power within the ripple's swing over [t0, t1].
            step = prof.counter_step_kwh() or float(np.spacing(np.float32(scn.energy_at(m, t1))))
            assert scn.energy_at(m, t0) - step <= v["energy_import_kwh"] <= scn.energy_at(m, t1) + step
            grid = np.linspace(t0, t1, 101)
            p = scn.power_at(m, grid)
            assert p.min() * (1 - 1e-6) <= v["power_w"] <= p.max() * (1 + 1e-6)
            assert 0 < t1 - t0 < 10  # a few hundred ms of real time at most


FAULTS = [
    {"machine": "m1", "kind": "meter_silent", "from_s": 400, "to_s": 500},
    {"machine": "m1", "kind": "modbus_exception", "from_s": 600, "to_s": 700},
    {"machine": "m2", "kind": "modbus_exception", "from_s": 600, "to_s": 700, "code": 6},
    {"machine": "m1", "kind": "counter_reset", "from_s": 800},
    {"machine": "m2", "kind": "counter_reset", "from_s": 800},
    {"machine": "m2", "kind": "power_nan", "from_s": 1000, "to_s": 1100},
]


@pytest.mark.parametrize("framer", ["tcp", "rtu-over-tcp"])
async def test_meter_faults_seen_by_a_real_client(framer):
    s = DEMO.with_faults(FAULTS)
    m1, m2 = s.machines
    clock = ManualClock(t=450.0)
    async with meter_server(s, clock, framer, timeout=0.3) as (bank, client):
        # meter_silent: no answer at all, the request times out...
        started = time.monotonic()
        with pytest.raises(Exception):  # pymodbus: ModbusIOException (no response received)
            rr = await asyncio.wait_for(client.read_input_registers(72, count=2, device_id=1), 2.0)
            assert rr.isError(), rr  # (not reached: a response would be a failure)
        assert 0.25 <= time.monotonic() - started < 2.0
        if framer == "rtu-over-tcp":
            client.close()  # as the agent does after an RTU timeout: no tid to match a late answer
            assert await client.connect()
        # ... while the other meter on the same connection answers at once
        v = await read_profile(client, 2, "schneider-iem3000", ["energy_import_kwh"])
        assert v["energy_import_kwh"] == pytest.approx(math.floor(scn.energy_at(m2, 450.0) * 1000) / 1000, abs=1e-12)
        clock.t = 500.0  # the silence ends at to_s (exclusive)
        if not client.connected:
            assert await client.connect()
        v = await read_profile(client, 1, "eastron-sdm630", ["energy_import_kwh"])
        assert v["energy_import_kwh"] == float(np.float32(scn.energy_at(m1, 500.0)))

        # modbus_exception: code 4 (device failure) by default, or the one given
        clock.t = 650.0
        rr = await client.read_input_registers(72, count=2, device_id=1)
        assert rr.isError() and rr.exception_code == 4
        rr = await client.read_holding_registers(3203, count=4, device_id=2)
        assert rr.isError() and rr.exception_code == 6

        # counter_reset at 800: the register restarts from 0 (E(t) - E(800) after)
        clock.t = 799.0
        before = await read_profile(client, 2, "schneider-iem3000", ["energy_import_kwh"])
        assert before["energy_import_kwh"] > 800
        clock.t = 900.0
        for m in (m1, m2):
            v = await read_profile(client, m.meter.unit_id, m.meter.profile, ["energy_import_kwh", "power_w"])
            since = scn.energy_at(m, 900.0) - scn.energy_at(m, 800.0)
            want = float(np.float32(since)) if m is m1 else math.floor(since * 1000) / 1000
            assert v["energy_import_kwh"] == pytest.approx(want, abs=1e-12) and 0 < want < 0.5
            assert v["power_w"] == pytest.approx(scn.power_at(m, 900.0), rel=1e-6)

        # power_nan: power (and currents) NaN, the counter unaffected
        clock.t = 1050.0
        v = await read_profile(client, 2, "schneider-iem3000")
        assert math.isnan(v["power_w"]) and math.isnan(v["current_l1_a"])
        assert v["energy_import_kwh"] == pytest.approx(
            math.floor((scn.energy_at(m2, 1050.0) - scn.energy_at(m2, 800.0)) * 1000) / 1000, abs=1e-12)
        clock.t = 1100.0
        assert not math.isnan((await read_profile(client, 2, "schneider-iem3000", ["power_w"]))["power_w"])


def test_integer_encoding_floors_counters_and_marks_nan():
    prof = load_profile("schneider-iem3000")
    e = prof.points["energy_import_kwh"]
    assert codec.decode(encode_value(e, 802.25, "big", "big", counter=True), "i64") == 802250  # no 802249
    assert codec.decode(encode_value(e, 802.2509999, "big", "big", counter=True), "i64") == 802250
    nan_i32 = encode_value(e.model_copy(update={"type": "i32", "scale": 1.0}), math.nan, "big", "big", counter=False)
    assert nan_i32 == [0x8000, 0x0000]
    nan_u16 = encode_value(e.model_copy(update={"type": "u16", "scale": 1.0}), math.nan, "big", "big", counter=False)
    assert nan_u16 == [0xFFFF]
    big = encode_value(e.model_copy(update={"type": "u16", "scale": 1.0}), 1e9, "big", "big", counter=False)
    assert big == [0xFFFF]  # clamped, never a struct error
    v = meter_values(DEMO.machines[0], 300.0, DEMO.with_faults([FAULTS[0]]).faults)  # refusing faults ignored
    assert v["power_w"] == scn.power_at(DEMO.machines[0], 300.0)


# ---------------------------------------------------------------------------- CNCs (OPC UA)


def _cnc_scenario() -> scn.Scenario:
    """The demo plus m3, whose jobs are 2 s apart and back to back (many changes per tick)."""
    data = _demo_data()
    data["machines"].append({
        "id": "m3", "meter": {"unit_id": 3, "profile": "eastron-sdm630"},
        "cnc": {"channel": "M3.Channel_1", "job": "M3.Job"},
        "power_w": {"ready": 500, "setup": 900, "processing": 4000, "interrupted": 700},
        "jobs": [
            {"job_id": "J-3001", "program": "Q1", "product": "X", "serial": "S1", "parts": 2, "start_s": 100,
             "phases": [["setup", 10], ["processing", 50]]},
            {"job_id": "J-3002", "program": "Q2", "serial": "S2", "start_s": 162,
             "phases": [["processing", 30], ["interrupted", 5], ["processing", 20]]},
            {"job_id": "J-3003", "program": "Q2", "serial": "S3", "start_s": 217, "phases": [["processing", 40]]},
        ]})
    return scn.parse(data)


CNC_SCN = _cnc_scenario()


@pytest.fixture(scope="module")
async def cnc():
    clock = ManualClock(t=-50.0)
    bank = CncBank(CNC_SCN, clock, port=0)
    started = time.monotonic()
    await bank.start()
    bank.start_s = time.monotonic() - started
    yield bank, clock
    await bank.stop()


async def test_cnc_address_space_and_types(cnc):
    bank, clock = cnc
    assert bank.start_s < 10
    async with Client(bank.endpoint, timeout=5) as client:
        idx = await client.get_namespace_index(CNC_SCN.namespace)
        node = await client.nodes.objects.get_child([f"{idx}:m1", f"{idx}:Channel_1", f"{idx}:ActStatus"])
        assert node.nodeid == ua.NodeId("M1.Channel_1.ActStatus", idx)
        job = await client.nodes.objects.get_child([f"{idx}:m2", f"{idx}:Job", f"{idx}:RunsCompleted"])
        assert job.nodeid == ua.NodeId("M2.Job.RunsCompleted", idx)
        assert (await node.read_data_type_as_variant_type()) == ua.VariantType.Int32
        assert (await job.read_data_type_as_variant_type()) == ua.VariantType.UInt32
        ids = load_nodemap_ids("m3", idx)
        assert set(ids) == {"channel_status", "program_status", "operation_mode", "program", "job_id",
                            "parts_total", "product", "serial", "subassembly"}
        values = {q: await client.get_node(n).read_value() for q, n in ids.items()}
        assert values == CNC_SCN.machine("m3").timeline.cnc_values(clock.t)


def load_nodemap_ids(machine_id: str, idx: int) -> dict[str, str]:
    """The node ids the agent's node map resolves to ('nsu=URI;s=…'), with the URI's index."""
    m = CNC_SCN.machine(machine_id)
    ids = m.cnc.node_map_model.resolve({"namespace": CNC_SCN.namespace, "channel": m.cnc.channel, "job": m.cnc.job})
    prefix = f"nsu={CNC_SCN.namespace};"
    assert all(text.startswith(prefix) for text in ids.values())
    return {q: f"ns={idx};" + text.removeprefix(prefix) for q, text in ids.items()}


async def test_cnc_publishes_every_change_with_its_exact_instant(cnc):
    bank, clock = cnc
    async with Client(bank.endpoint, timeout=5) as client:
        idx = await client.get_namespace_index(CNC_SCN.namespace)
        nodes = {}
        for m in CNC_SCN.machines:
            for q, text in load_nodemap_ids(m.id, idx).items():
                nodes[(m.id, q)] = client.get_node(text)
        by_nodeid = {n.nodeid: key for key, n in nodes.items()}
        sub = await client.create_subscription(10, None, queue_maxsize=100_000)
        got: dict[tuple[str, str], list[tuple[object, datetime]]] = {key: [] for key in nodes}
        async with sub:
            await sub.subscribe_data_change(list(nodes.values()), queuesize=1000, sampling_interval=0)

            async def drain(want: int) -> bool:
                while (ev := await sub.next_event(timeout=0.01)) is not None:
                    if isinstance(ev, DataChangeEvent):
                        dv = ev.data.monitored_item.Value
                        stamp = dv.SourceTimestamp
                        stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
                        got[by_nodeid[ev.node.nodeid]].append((ev.value, stamp))
                return sum(map(len, got.values())) >= want

            def expected(upto: float) -> dict:
                out = {}
                for m in CNC_SCN.machines:
                    changes = m.timeline.cnc_changes
                    for q in changes[0][1]:
                        seq = [(v, t) for t, ch in changes for qq, v in ch.items() if qq == q and t <= upto]
                        # the initial value (unchanged since before the server started) carries no exact instant
                        out[(m.id, q)] = [(seq[0][0], None)] + [(v, utc(clock.anchor + t)) for v, t in seq[1:]]
                return out

            # Walk scenario time: small steps, then one jump over many changes (the update task
            # publishes each of them in order, with its own instant), then to the end.
            for t in (-50.0, 159.0, 160.0, 300.0, 460.0, 1000.0, CNC_SCN.duration_s):
                if t == 300.0:
                    bank.max_batch = 0
                clock.t = t
                want = expected(t)
                await until(lambda: drain(sum(map(len, want.values()))), 5.0, f"changes up to t={t}")
                for key, seq in want.items():
                    assert [v for v, _ in got[key]] == [v for v, _ in seq], key
                    assert [s for _, s in got[key][1:]] == [s for _, s in seq[1:]], key  # exact instants
                    assert got[key][0][1] <= utc(clock.anchor + t)
            assert bank.max_batch >= 2  # 160 -> 300 spans several m3 changes: published one by one

        # polled values equal the timeline at the end
        for (machine, q), node in nodes.items():
            assert await node.read_value() == CNC_SCN.machine(machine).timeline.cnc_values(clock.t)[q]
        dv = await nodes[("m3", "job_id")].read_data_value()
        assert dv.SourceTimestamp.replace(tzinfo=timezone.utc) == utc(clock.anchor + 257.0)  # J-3003's end


# ---------------------------------------------------------------------------- serving


async def test_serve_until_end_on_free_ports():
    clock = ManualClock(t=100.0)
    s = CNC_SCN.with_faults([])
    lines: list[str] = []
    task = asyncio.create_task(serve(s, clock, "127.0.0.1", 0, 0, until_end=True, grace_s=5.0, ready=lines.append))
    await until(lambda: lines or task.done(), 10.0, "ready")
    assert lines and lines[0].startswith(READY) and "units 1,2,3" in lines[0], lines
    port = int(lines[0].split("modbus 127.0.0.1:")[1].split()[0])
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
    assert await client.connect()
    rr = await client.read_input_registers(72, count=2, device_id=3)
    assert codec.decode(rr.registers, "f32") == float(np.float32(scn.energy_at(s.machine("m3"), 100.0)))
    client.close()
    clock.t = s.duration_s + 4.0
    await asyncio.sleep(0.6)
    assert not task.done()  # the grace is not over
    clock.t = s.duration_s + 5.0
    await asyncio.wait_for(task, 5.0)


def test_simulate_truth_command():
    out = subprocess.run([sys.executable, "-m", "energy_agent", "simulate", str(DEMO_PATH), "--truth"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == scn.truth(DEMO)


async def test_simulate_command_serves_on_the_scaled_clock(tmp_path):
    data = _demo_data()
    data["speed"] = 20
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    anchor = datetime.fromtimestamp(time.time(), timezone.utc)
    proc = subprocess.Popen(
        [sys.executable, "-m", "energy_agent", "simulate", str(path), "--modbus-port", "0", "--opcua-port", "0",
         "--modbus-framer", "rtu-over-tcp", "--anchor", anchor.isoformat()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.startswith(READY), (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("modbus 127.0.0.1:")[1].split()[0])
        endpoint = line.split("opcua ")[1].split(";")[0]
        clock = Clock(20.0, anchor.timestamp())
        m1 = scn.parse(data).machine("m1")
        client = AsyncModbusTcpClient("127.0.0.1", port=port, framer=FramerType.RTU, timeout=1.0, retries=0)
        assert await client.connect()
        t0 = clock.wall() - clock.anchor
        rr = await client.read_input_registers(72, count=2, device_id=1)
        t1 = clock.wall() - clock.anchor
        client.close()
        e = codec.decode(rr.registers, "f32")
        step = float(np.spacing(np.float32(e)))
        assert scn.energy_at(m1, t0) - step <= e <= scn.energy_at(m1, t1) + step
        async with Client(endpoint, timeout=5) as opc:
            idx = await opc.get_namespace_index(data["namespace"])
            status = await opc.get_node(f"ns={idx};s=M1.Channel_1.ActStatus").read_value()
        assert status in (0, 1, 2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, proc.stderr.read()
