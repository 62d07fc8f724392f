"""Meters that refuse coalesced reads: the driver splits the refused request, reads the parts,
keeps the learned plan for that meter and says so once; a refused point of its own is a wrong
map and stays an error.

Named after what broke: strict_sdm630_with_a_wide_profile_read_zero_kwh (every job 0 kWh: an
SDM630 answers exception 2 to a request touching an unmapped register, and a profile with
max_gap 20 asked for input 52+22 on every poll).
"""

from __future__ import annotations

import logging
import struct
import time

import pytest
import yaml

from energy_agent.core.clock import Clock
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import PROFILE_DIR, MeterProfile, load_profile
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.scenario import Scenario
from energy_agent.simulators.services import free_port
from tests.rawmodbus import RawModbusServer
from tests.test_meter_profiles import point_step, truth_range

SPEED = 20.0
POLL_AT_S = 60.0
UNIT = 3
LEARNED_SDM630 = ("meter pm-1: reads across unmapped registers refused (exception 2 reading input 52..73); "
                  "reading input 52..53, 72..73 separately from now on")


def wide_sdm630(tmp_path) -> str:
    """The SDM630 map under its own name with the max_gap 20 that broke: power and energy in
    one request across 30055..30072."""
    data = yaml.safe_load((PROFILE_DIR / "eastron-sdm630.yaml").read_text())
    data.update(name="sdm630-wide", max_gap=20, max_block=125)
    path = tmp_path / "sdm630-wide.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def scenario(profile: str, *, strict: bool) -> Scenario:
    return Scenario.model_validate({
        "name": "strict", "speed": SPEED, "duration_s": 600,
        "machines": [{
            "id": "m1",
            "meter": {"unit_id": UNIT, "profile": profile, "strict": strict, "energy_offset_kwh": 4321.5,
                      "ripple": {"amplitude": 0.05, "period_s": 37.0, "phase": 0.4}},
            "cnc": {"channel": "M1.Channel_1", "job": "M1.Job"},
            "power_w": {"ready": 800.0, "processing": 4200.0},
            "jobs": [{"job_id": "J-1", "program": "O1", "start_s": 10.0, "phases": [["processing", 300.0]]}],
        }],
    })


def check_against_truth(prof: MeterProfile, machine, values: dict[str, float], t0: float, t1: float) -> None:
    """Each value within what the simulated meter showed during [t0, t1], one register step
    either side (float32 spacing at the value: 0.49 Wh for the counter at 4321.5 kWh) plus a
    relative 1e-9 for the truth's own float arithmetic."""
    truth = truth_range(machine, t0, t1)
    for q, v in values.items():
        lo, hi = truth[q]
        tol = point_step(prof, q, hi) + 1e-9 * max(abs(lo), abs(hi))
        assert lo - tol <= v <= hi + tol, f"{q} = {v!r}, the meter showed {lo!r}..{hi!r} (tolerance {tol:g})"


async def test_strict_sdm630_with_a_wide_profile_read_zero_kwh(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.modbus")
    path = wide_sdm630(tmp_path)
    prof = load_profile(path)
    s = scenario(path, strict=True)
    (machine,) = s.machines
    clock = Clock(speed=SPEED, anchor=time.time() - POLL_AT_S / SPEED)
    bank = MeterBank(s, clock, port=free_port())
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=1.0)
    try:
        drv = MeterDriver("pm-1", UNIT, prof, bus, clock, timeout_s=1.0)
        assert [b.span for b in drv.blocks] == ["input 52..73"]
        for k in range(4):
            requests = bank.requests
            t0 = bank.sim_time()
            r = await drv.poll()
            t1 = bank.sim_time()
            assert r.ok, r.error
            assert set(r.values) == {"power_w", "energy_import_kwh"}
            check_against_truth(prof, machine, r.values, t0, t1)
            # the first poll: the refused block and its two parts; then the learned plan alone
            assert bank.requests - requests == (3 if k == 0 else 2)
        assert bank.refused_strict == 1
        assert [b.span for b in drv.blocks] == ["input 52..53", "input 72..73"]
        assert [r.getMessage() for r in caplog.records if r.name == "energy_agent.drivers.modbus"] == [LEARNED_SDM630]

        # Every point (what probe reads): 0..11 stays one request (adjacent points), 52..75 is
        # refused and read as its runs of adjacent points.
        all_points = MeterDriver("pm-all", UNIT, prof, bus, clock, timeout_s=1.0, quantities=tuple(prof.points))
        assert [b.span for b in all_points.blocks] == ["input 0..11", "input 52..75"]
        t0 = bank.sim_time()
        r = await all_points.poll()
        t1 = bank.sim_time()
        assert r.ok and set(r.values) == set(prof.points), r.error
        check_against_truth(prof, machine, r.values, t0, t1)
        assert [b.span for b in all_points.blocks] == ["input 0..11", "input 52..53", "input 62..63", "input 70..75"]
        assert bank.refused_strict == 2
    finally:
        await bus.close()
        await bank.stop()


async def test_a_lenient_meter_reads_the_wide_block_in_one_request(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.modbus")
    path = wide_sdm630(tmp_path)
    s = scenario(path, strict=False)
    clock = Clock(speed=SPEED, anchor=time.time() - POLL_AT_S / SPEED)
    bank = MeterBank(s, clock, port=free_port())
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=1.0)
    try:
        drv = MeterDriver("pm-1", UNIT, load_profile(path), bus, clock, timeout_s=1.0)
        for _ in range(2):
            requests = bank.requests
            assert (await drv.poll()).ok
            assert bank.requests - requests == 1
        assert [b.span for b in drv.blocks] == ["input 52..73"] and not drv.learned
        assert not [r for r in caplog.records if r.name == "energy_agent.drivers.modbus"]
    finally:
        await bus.close()
        await bank.stop()


def strict_registers(mapped: dict[int, float], refuse_with: int = 2):
    """A strict meter: float32 values at ``mapped`` input addresses, exception ``refuse_with``
    for a read touching any other register."""
    words = {}
    for address, value in mapped.items():
        words[address], words[address + 1] = struct.unpack(">HH", struct.pack(">f", value))

    def registers(unit, fc, address, count):
        span = range(address, address + count)
        if fc != 4 or not all(a in words for a in span):
            return refuse_with
        return [words[a] for a in span]
    return registers


def profile(points: dict[str, int], max_gap: int = 20) -> MeterProfile:
    return MeterProfile(name="test-map", vendor="test", model="m", document="this test", max_gap=max_gap,
                        points={q: {"address": a, "function": "input", "type": "f32"} for q, a in points.items()})


async def test_a_point_refused_on_its_own_is_a_wrong_map(caplog):
    # The meter maps power at 52 and energy at 72; the profile says energy is at 74.
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.modbus")
    raw = RawModbusServer(strict_registers({52: 4200.0, 72: 1234.5}))
    port = await raw.start()
    bus = ModbusBus("127.0.0.1", port, timeout_s=0.5)
    try:
        drv = MeterDriver("pm-1", 1, profile({"power_w": 52, "energy_import_kwh": 74}), bus, Clock(), timeout_s=0.5)
        for _ in range(2):
            r = await drv.poll()
            assert not r.ok and not r.values
            assert "exception code 2 (illegal data address) reading input 74+2" in r.error
            assert "the meter has no register input 74 (energy_import_kwh, f32)" in r.error
        assert [b.span for b in drv.blocks] == ["input 52..53", "input 74..75"]
        assert raw.requests == 3 + 2  # refused block and its parts, then the parts alone
        assert len([r for r in caplog.records if "separately from now on" in r.getMessage()]) == 1
    finally:
        await bus.close()
        await raw.stop()


async def test_a_meter_refusing_every_read_teaches_nothing(caplog):
    # Exception 2 to the parts as well: not a matter of the span (a meter in a fault state, a
    # wrong unit behind a gateway). The plan stays; the poll fails with the request's own error.
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.modbus")
    raw = RawModbusServer(lambda unit, fc, address, count: 2)
    port = await raw.start()
    bus = ModbusBus("127.0.0.1", port, timeout_s=0.5)
    try:
        drv = MeterDriver("pm-1", 1, profile({"power_w": 52, "energy_import_kwh": 72}), bus, Clock(), timeout_s=0.5)
        r = await drv.poll()
        assert not r.ok and r.error.endswith("exception code 2 (illegal data address) reading input 52+22")
        assert [b.span for b in drv.blocks] == ["input 52..73"] and not drv.learned
        assert not [r for r in caplog.records if r.name == "energy_agent.drivers.modbus"]
    finally:
        await bus.close()
        await raw.stop()


@pytest.mark.parametrize("code", [2, 3])
async def test_a_meter_serving_one_value_per_request(code, caplog):
    # Adjacent points (no gap) refused together with exception 3 (illegal data value) or 2:
    # read one by one.
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.modbus")
    values = {0: 231.0, 2: 229.5, 4: 230.5}

    def one_at_a_time(unit, fc, address, count):
        return strict_registers(values)(unit, fc, address, count) if count <= 2 else code

    raw = RawModbusServer(one_at_a_time)
    port = await raw.start()
    bus = ModbusBus("127.0.0.1", port, timeout_s=0.5)
    try:
        pts = {"power_w": 0, "voltage_l1_v": 2, "energy_import_kwh": 4}
        drv = MeterDriver("pm-1", 1, profile(pts), bus, Clock(), timeout_s=0.5, quantities=tuple(pts))
        r = await drv.poll()
        assert r.ok, r.error
        assert r.values == {"power_w": 231.0, "voltage_l1_v": 229.5, "energy_import_kwh": 230.5}
        assert [b.span for b in drv.blocks] == ["input 0..1", "input 2..3", "input 4..5"]
        (line,) = [r.getMessage() for r in caplog.records if r.name == "energy_agent.drivers.modbus"]
        assert line == (f"meter pm-1: reads of several values in one request refused (exception {code} reading "
                        "input 0..5); reading input 0..1, 2..3, 4..5 separately from now on")
    finally:
        await bus.close()
        await raw.stop()


def test_split_block_runs_then_points():
    from energy_agent.drivers.profile import plan_blocks, split_block

    prof = profile({"power_w": 52, "power_factor": 62, "frequency_hz": 70, "energy_import_kwh": 72,
                    "energy_export_kwh": 74})
    (block,) = plan_blocks(prof)
    assert block.gaps and block.span == "input 52..75"
    runs = split_block(block)
    assert [b.span for b in runs] == ["input 52..53", "input 62..63", "input 70..75"]
    assert [(q, off) for q, off, _ in runs[2].members] == [("frequency_hz", 0), ("energy_import_kwh", 2),
                                                           ("energy_export_kwh", 4)]
    assert [b.span for b in split_block(runs[2])] == ["input 70..71", "input 72..73", "input 74..75"]
    assert split_block(runs[0]) == []
    assert not any(b.gaps for b in runs)
