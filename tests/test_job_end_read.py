"""A job's end triggers a meter read at once: its record does not wait for the next poll.

The energy of a job needs a counter reading after its end. With meters polled every 60 plant
seconds (1 s real at 60x) that reading would come a uniformly random 0-1 s real after the
end; the agent reads the machine's meter as soon as the tracker has ended a job. The CNCs
hand over each instant at the end of its publish response (``settle_s: 0``). Checked on the
whole agent against the simulated plant: every job is finished less than a quarter poll
interval after its end (without the read, all eight would have to fall there by chance:
(1/4)^8), with the sample after its end, and the extra reads are counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timezone

import yaml

from energy_agent.app import config
from energy_agent.app.runtime import Agent
from energy_agent.core.clock import Clock
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

SPEED = 60.0
POLL_S = 60.0  # plant seconds: 1 s real


def _config(tmp_path, scenario, modbus_port: int, opcua_port: int, anchor: float) -> dict:
    meter = {"host": "127.0.0.1", "port": modbus_port, "poll_interval_s": POLL_S}
    return {
        "site": "test-site", "agent_id": "gw-end",
        "clock": {"speed": SPEED, "anchor": datetime.fromtimestamp(anchor, timezone.utc).isoformat()},
        "ledger": {"path": str(tmp_path / "ledger.db")}, "archive": {"enabled": False},
        "emission_factors": {"vn-2023": {"value": 0.6592, "authority": "MONRE DCC", "document": "notice",
                                         "region": "VN", "year": 2023, "basis": "location"}},
        "meters": [{"id": f"pm-{m.meter.unit_id}", "unit_id": m.meter.unit_id, "profile": m.meter.profile, **meter}
                   for m in scenario.machines],
        "cncs": [{"id": f"cnc-{m.id}", "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}", "interval_s": 0.5,
                  "settle_s": 0, "params": {"namespace": scenario.namespace, "channel": m.cnc.channel,
                                            "job": m.cnc.job}} for m in scenario.machines],
        "machines": [{"id": m.id, "meter": f"pm-{m.meter.unit_id}", "cnc": f"cnc-{m.id}",
                      "emission_factor": "vn-2023"} for m in scenario.machines],
    }


async def test_each_job_is_finished_by_a_read_at_its_end(tmp_path):
    data = yaml.safe_load(DEMO_SCENARIO.read_text())
    data["speed"] = SPEED
    scenario = scn.parse(data)
    anchor = float(math.ceil(time.time()) + 3)
    clock = Clock(SPEED, anchor)
    cncs, meters = CncBank(scenario, clock, port=free_port()), MeterBank(scenario, clock, port=free_port())
    await cncs.start()
    await meters.start()
    agent = Agent(config.parse(_config(tmp_path, scenario, meters.port, cncs.port, anchor), tmp_path))
    finished = []
    store = agent._finished

    def spy(pending):
        if pending.ending.info is not None:  # a job (intervals are finished too)
            finished.append((pending, agent.clock.mono()))
        store(pending)

    for tracker in agent.trackers.values():
        tracker.on_finished = spy
    truth = scn.truth(scenario)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        deadline = time.monotonic() + (anchor - time.time()) + scenario.duration_s / SPEED + 20.0
        while len(finished) < len(truth):
            assert not task.done(), "the agent stopped by itself"
            assert time.monotonic() < deadline, f"{len(finished)} of {len(truth)} jobs finished"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
        await meters.stop()
        await cncs.stop()
    assert sorted(p.ending.info.job_id for p, _ in finished) == sorted(t["job_id"] for t in truth)
    for pending, at in finished:  # plant seconds (the agent's clock runs at the plant's speed)
        job = pending.ending
        assert "no_meter_sample_after_end" not in pending.inputs.flags, job.info.job_id
        assert at - job.end < POLL_S / 4, (job.info.job_id, at - job.end)
    assert agent.stats.extra_polls >= len(truth)
