"""The agent, configured only by YAML, against peers that are not our simulators.

The meter is a Modbus TCP server written from the protocol spec in tests/rawmodbus.py, serving
float32 registers packed by hand with ``struct``; the CNC is an OPC UA server built here with
asyncua, with numeric node ids in a vendor namespace and a node map written as data by the
test. Nothing depends on private agreements between our client and our simulators.
"""

import asyncio
import struct
import time
from datetime import datetime, timezone

import numpy as np
import pytest
import yaml
from asyncua import Server, ua

from energy_agent.app import config
from energy_agent.app.runtime import Agent
from tests.rawmodbus import RawModbusServer

NS_URI = "urn:test:foreign-vendor-cnc"
E0_KWH = 50.0

NODE_MAP = {
    "name": "foreign-vendor",
    "spec": "a vendor's own node set (test)",
    "params": {"ns": "namespace URI"},
    "points": {
        "run_state": {"node": "nsu={ns};i=2001"},  # vendor enum: 0 idle, 1 cycle, 2 feed hold, 3 setup
        "program": {"node": "nsu={ns};i=2002"},
        "job_id": {"node": "nsu={ns};i=2003"},
        "serial": {"node": "nsu={ns};i=2004"},
        "parts_total": {"node": "nsu={ns};i=2005"},
    },
    "states": [
        {"when": {"run_state": 1}, "state": "processing"},
        {"when": {"run_state": 2}, "state": "interrupted"},
        {"when": {"run_state": 3}, "state": "setup"},
        {"state": "ready"},
    ],
    "job": {"key": ["job_id", "program"]},
}


class PowerSchedule:
    """Piecewise-constant power from given wall instants; energy is its exact integral."""

    def __init__(self, p0: float):
        self.steps = [(time.time() - 3600.0, p0)]

    def set(self, t: float, p: float) -> None:
        self.steps.append((t, p))

    def power(self, t: float) -> float:
        return [p for s, p in self.steps if s <= t][-1]

    def energy_kwh(self, t: float) -> float:
        e = 0.0
        for (s, p), nxt in zip(self.steps, self.steps[1:] + [(float("inf"), 0.0)]):
            if t > s:
                e += p * (min(t, nxt[0]) - s)
        return E0_KWH + e / 3.6e6


def sdm630_registers(schedule: PowerSchedule):
    def regs(unit, fc, address, count):
        if unit != 3 or fc != 4:
            return 2  # illegal data address
        now = time.time()
        table = {52: schedule.power(now), 72: schedule.energy_kwh(now)}
        words = []
        a = address
        while a < address + count:
            if a in table:
                hi, lo = struct.unpack(">HH", struct.pack(">f", table[a]))
                words += [hi, lo]
                a += 2
            else:
                words.append(0)
                a += 1
        return words[:count]
    return regs


async def _write(node, value, vtype, when: float):
    dv = ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=datetime.fromtimestamp(when, timezone.utc))
    await node.write_value(dv)


@pytest.fixture(scope="module")
async def cnc_server(unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    idx = await server.register_namespace(NS_URI)
    obj = await server.nodes.objects.add_object(ua.NodeId(2000, idx), ua.QualifiedName("Lathe", idx))
    nodes = {
        "run_state": await obj.add_variable(ua.NodeId(2001, idx), ua.QualifiedName("RunState", idx), 0, ua.VariantType.Int32),
        "program": await obj.add_variable(ua.NodeId(2002, idx), ua.QualifiedName("Program", idx), "", ua.VariantType.String),
        "job_id": await obj.add_variable(ua.NodeId(2003, idx), ua.QualifiedName("Order", idx), "", ua.VariantType.String),
        "serial": await obj.add_variable(ua.NodeId(2004, idx), ua.QualifiedName("Serial", idx), "", ua.VariantType.String),
        "parts_total": await obj.add_variable(ua.NodeId(2005, idx), ua.QualifiedName("Parts", idx), 0, ua.VariantType.UInt32),
    }
    async with server:
        yield port, nodes


async def _until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_agent_against_foreign_modbus_and_opcua(tmp_path, cnc_server, mode):
    opc_port, nodes = cnc_server
    schedule = PowerSchedule(800.0)
    meter = RawModbusServer(sdm630_registers(schedule))
    modbus_port = await meter.start()
    (tmp_path / "vendor-map.yaml").write_text(yaml.safe_dump(NODE_MAP))
    plant = {
        "site": "test-site", "agent_id": "gw-test",
        "ledger": {"path": "ledger.db"},
        "emission_factors": {"vn-2023": {"value": 0.6592, "authority": "MONRE DCC", "document": "notice",
                                         "region": "VN", "year": 2023, "basis": "location"}},
        "meters": [{"id": "pm-x", "host": "127.0.0.1", "port": modbus_port, "unit_id": 3,
                    "profile": "eastron-sdm630", "poll_interval_s": 0.05, "timeout_s": 1.0}],
        "cncs": [{"id": "cnc-x", "endpoint": f"opc.tcp://127.0.0.1:{opc_port}", "node_map": "vendor-map.yaml",
                  "params": {"ns": NS_URI}, "interval_s": 0.05, "mode": mode}],
        "machines": [{"id": "lathe-9", "meter": "pm-x", "cnc": "cnc-x", "emission_factor": "vn-2023",
                      "programs": {"P-77": {"product": "SPU-40", "subassembly": "spindle-housing"}}}],
    }
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(plant))
    agent = Agent(config.load(tmp_path / "plant.yaml"))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    tracker = agent.trackers["lathe-9"]
    try:
        await _until(lambda: tracker.seen_cnc and len(tracker.samples) > 3, 20, "first CNC snapshot and meter samples")

        parts_before = await nodes["parts_total"].read_value()  # the server is shared by this module's tests
        t1 = time.time()  # setup starts: job ORD-1, program P-77
        schedule.set(t1, 2000.0)
        await _write(nodes["program"], "P-77", ua.VariantType.String, t1)
        await _write(nodes["job_id"], "ORD-1", ua.VariantType.String, t1)
        await _write(nodes["serial"], "S-0001", ua.VariantType.String, t1)
        await _write(nodes["run_state"], 3, ua.VariantType.Int32, t1)
        n0 = meter.requests
        await _until(lambda: meter.requests >= n0 + 10, 10, "10 meter polls in setup")
        t2 = time.time()  # cycle start
        schedule.set(t2, 6000.0)
        await _write(nodes["run_state"], 1, ua.VariantType.Int32, t2)
        # Cut until the meter has been sampled 20 times in processing (~1 s at 50 ms polls).
        n0 = meter.requests
        await _until(lambda: meter.requests >= n0 + 20, 10, "20 meter polls while processing")
        t3 = time.time()  # cycle end: one part, order cleared
        schedule.set(t3, 800.0)
        await _write(nodes["run_state"], 0, ua.VariantType.Int32, t3)
        await _write(nodes["parts_total"], parts_before + 1, ua.VariantType.UInt32, t3)
        await _write(nodes["job_id"], "", ua.VariantType.String, t3)
        await _until(lambda: agent.stats.records >= 2, 15, "the idle interval before the job, and the job record")
    finally:
        stop.set()
        await task
        await meter.stop()

    from energy_agent.records.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.db")
    recs = [r.to_json() for r in ledger.records()]  # the records' JSON form: the contract
    ledger.close_sync()
    jobs = [r for r in recs if "job" in r]
    assert len(jobs) == 1
    r = jobs[0]
    # product and subassembly are not on this CNC: they come from the machine's program table.
    assert r["job"] == {"key": "ORD-1", "job_id": "ORD-1", "program": "P-77", "product": "SPU-40",
                        "serials": ["S-0001"], "subassembly": "spindle-housing", "order": None,
                        "assignment": "cnc", "parts": 1, "end_reason": "parts_counter"}
    assert r["start"] == datetime.fromtimestamp(t1, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert r["end"] == datetime.fromtimestamp(t3, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    true_setup = 2000.0 * (t2 - t1) / 3.6e6
    true_proc = 6000.0 * (t3 - t2) / 3.6e6
    truth = true_setup + true_proc
    # Tolerance: max(0.1 % of the truth, 2 steps of the float32 counter at 50 kWh). The counter
    # is read as float32, so the energy can only be known to its resolution at each boundary.
    step = float(np.spacing(np.float32(E0_KWH + truth)))
    tol = max(1e-3 * truth, 2 * step)
    assert r["energy"]["method"] == "counter"
    assert r["quality"]["coverage"] == 1.0 and r["quality"]["gap_count"] == 0
    assert abs(r["energy"]["kwh"] - truth) <= tol, (r["energy"], truth, tol)
    assert abs(r["energy"]["by_state"]["setup"] - true_setup) <= tol
    assert abs(r["energy"]["by_state"]["processing"] - true_proc) <= tol
    assert r["emissions"]["kgco2e"] == pytest.approx(r["energy"]["kwh"] * 0.6592, abs=1e-9)
