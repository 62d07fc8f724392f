"""`energy-agent probe` against the simulators and a hand-written meter with swapped words."""

import struct
import time

import pytest
import yaml

from energy_agent.app import config
from energy_agent.app.probe import probe
from energy_agent.core.clock import Clock
from energy_agent.drivers.profile import PROFILE_DIR
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_CONFIG, DEMO_SCENARIO
from energy_agent.simulators.services import free_port
from tests.rawmodbus import RawModbusServer

DEMO = scn.load(DEMO_SCENARIO)


def _plant(tmp_path, modbus_port, opcua_port=4840, pm1_profile=None):
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg.pop("clock")
    for m in cfg["meters"]:
        m["port"] = modbus_port
    if pm1_profile is not None:
        cfg["meters"][0]["profile"] = pm1_profile
    for c in cfg["cncs"]:
        c["endpoint"] = f"opc.tcp://127.0.0.1:{opcua_port}"
    return config.parse(cfg, tmp_path)


async def test_probe_meters_and_cnc_on_the_simulators(tmp_path):
    meters = MeterBank(DEMO, Clock(speed=20.0, anchor=time.time() - 15.0), port=free_port())
    cncs = CncBank(DEMO, Clock(speed=20.0, anchor=time.time() - 15.0), port=free_port())
    await meters.start()
    await cncs.start()
    try:
        loaded = _plant(tmp_path, meters.port, int(cncs.endpoint.rsplit(":", 1)[1]))
        for dev, n_points in (("pm-1", 11), ("pm-2", 11)):
            res = await probe(loaded, dev)
            assert res.ok, (res.error, res.warnings)
            assert len(res.rows) == n_points
            row = next(r for r in res.rows if r["quantity"] == "voltage_l1_v")
            assert float(row["value"]) == pytest.approx(230.0) and row["unit"] == "V"
        res = await probe(loaded, "cnc-1")
        assert res.ok, res.warnings
        derived = {r["point"]: r["value"] for r in res.rows}
        assert derived["(state)"] == "processing" and derived["(job key)"] == "J-1001"
        assert derived["channel_status"] == "0"
    finally:
        await cncs.stop()
        await meters.stop()


async def test_probe_names_swapped_word_order_and_dead_devices(tmp_path):
    def regs(unit, fc, address, count):
        words = [0] * count
        for addr, value in ((0, 231.5), (52, 4200.0), (70, 50.0), (72, 1234.5)):
            if address <= addr < address + count:
                hi, lo = struct.unpack(">HH", struct.pack(">f", value))
                words[addr - address], words[addr - address + 1] = lo, hi  # CDAB: words swapped
        return words

    raw = RawModbusServer(regs)
    port = await raw.start()
    try:
        res = await probe(_plant(tmp_path, port), "pm-1")
    finally:
        await raw.stop()
    assert res.error is None and not res.ok
    text = "\n".join(res.warnings)
    assert "voltage_l1_v" in text and "word order likely swapped (would read 231.5)" in text
    assert "frequency_hz" in text and "would read 50" in text

    res = await probe(_plant(tmp_path, free_port()), "pm-2")
    assert res.error and "cannot connect" in res.error
    res = await probe(_plant(tmp_path, free_port(), free_port()), "cnc-2")
    assert res.error and "opc.tcp://127.0.0.1:" in res.error


async def test_probe_unknown_device_lists_known_ones(tmp_path):
    from energy_agent.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown device 'pm-9' \(known: cnc-1, cnc-2, pm-1, pm-2\)"):
        await probe(_plant(tmp_path, 1), "pm-9")


async def test_probe_explains_the_spans_a_strict_meter_refused(tmp_path):
    # An SDM630 that refuses any read touching an unmapped register, probed with a copy of its
    # profile that lets requests span 20 unmapped registers: the probe splits the refused
    # request as the agent does, reads every point, and says which spans and why.
    data = yaml.safe_load((PROFILE_DIR / "eastron-sdm630.yaml").read_text())
    data.update(name="sdm630-wide", max_gap=20)
    (tmp_path / "sdm630-wide.yaml").write_text(yaml.safe_dump(data))
    values = {0: 231.5, 2: 230.0, 4: 229.0, 6: 10.0, 8: 11.0, 10: 12.0, 52: 4200.0, 62: 0.9, 70: 50.0,
              72: 1234.5, 74: 0.0}
    words = {}
    for addr, value in values.items():
        words[addr], words[addr + 1] = struct.unpack(">HH", struct.pack(">f", value))

    def strict(unit, fc, address, count):
        span = range(address, address + count)
        return [words[a] for a in span] if fc == 4 and all(a in words for a in span) else 2

    raw = RawModbusServer(strict)
    port = await raw.start()
    try:
        res = await probe(_plant(tmp_path, port, pm1_profile="sdm630-wide.yaml"), "pm-1")
    finally:
        await raw.stop()
    assert res.ok, (res.error, res.warnings)
    decoded = {r["register"]: float(r["value"]) for r in res.rows}
    assert decoded == {f"input {a}": pytest.approx(v) for a, v in values.items()}
    assert res.notes == [
        "reads across unmapped registers refused (exception 2 reading input 52..75); reading input 52..53, "
        "62..63, 70..75 separately; the agent reads this meter the same way (profile sdm630-wide lets a request "
        "span 20 unmapped registers (max_gap); this meter reads none)"]
    requests = {r["quantity"]: r["request"] for r in res.rows}
    assert requests["voltage_l1_v"] == "input 0+12"
    assert requests["power_w"] == "input 52+2 (split: input 52..75 refused, exception 2)"
    assert requests["energy_import_kwh"] == "input 70+6 (split: input 52..75 refused, exception 2)"
