"""`energy-agent probe` against the simulators and a hand-written meter with swapped words."""

import struct
import time

import pytest
import yaml

from energy_agent.app import config
from energy_agent.app.probe import probe
from energy_agent.core.clock import Clock
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_CONFIG, DEMO_SCENARIO
from energy_agent.simulators.services import free_port
from tests.rawmodbus import RawModbusServer

DEMO = scn.load(DEMO_SCENARIO)


def _plant(tmp_path, modbus_port, opcua_port=4840):
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg.pop("clock")
    for m in cfg["meters"]:
        m["port"] = modbus_port
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
