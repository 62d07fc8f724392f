"""Meter-poll lateness stats and first-poll phases: what ``energy-agent run --stats-file`` reports."""

import asyncio
import json
import math
import time

import numpy as np

from energy_agent.app import config
from energy_agent.app.runtime import (
    LATENESS_EDGES_MS,
    LATENESS_KEPT,
    Agent,
    Stats,
    spread_phases,
)
from energy_agent.core.clock import Clock
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_SCENARIO


def test_phases_spread_each_connection_and_interleave_connections():
    meters = [(f"a{k}", ("tcp", "h", 1)) for k in range(4)] + [(f"b{k}", ("tcp", "h", 2)) for k in range(4)]
    phase = spread_phases(meters)
    a = sorted(phase[f"a{k}"] for k in range(4))
    b = sorted(phase[f"b{k}"] for k in range(4))
    assert np.allclose(np.diff(a), 0.25) and np.allclose(np.diff(b), 0.25)  # one connection: evenly apart
    assert len(set(phase.values())) == 8 and all(0.0 <= p < 1.0 for p in phase.values())
    assert np.allclose(np.diff(sorted(phase.values())), 0.125)  # both together: no two at one instant


def test_window_percentiles_reset_and_cumulative_histogram():
    s = Stats()
    values = np.linspace(0.0, 0.3, 1001)  # seconds
    for v in values:
        s.late(float(v))
    w = s.window()
    assert w["window_polls"] == 1001
    assert math.isclose(w["late_p50_ms"], np.percentile(values * 1000, 50))
    assert math.isclose(w["late_p99_ms"], np.percentile(values * 1000, 99))
    assert sum(w["late_hist"]) == 1001 and len(w["late_hist"]) == len(LATENESS_EDGES_MS) - 1
    assert s.window()["window_polls"] == 0  # the window starts again
    for _ in range(LATENESS_KEPT + 10):  # more than the ring holds: the newest are kept, counted once
        s.late(0.001)
    w = s.window()
    assert w["window_polls"] == LATENESS_KEPT and sum(w["late_hist"]) == 1001 + LATENESS_KEPT


async def test_stats_file_counts_every_poll(tmp_path):
    bank = MeterBank(scn.load(DEMO_SCENARIO), Clock(1.0, time.time()), port=0)
    await bank.start()
    data = {
        "site": "s", "agent_id": "a", "ledger": {"path": str(tmp_path / "ledger.db")}, "archive": {"enabled": False},
        "emission_factors": {"f": {"value": 0.5, "authority": "x", "document": "y", "region": "VN", "year": 2023,
                                   "method": "m", "basis": "location"}},
        "meters": [{"id": f"pm-{u}", "host": "127.0.0.1", "port": bank.port, "unit_id": u,
                    "profile": bank.profiles[u].name, "poll_interval_s": 0.2} for u in bank.units],
        "machines": [],
    }
    agent = Agent(config.parse(data, tmp_path))
    agent.stats_interval_s, agent.stats_file = 0.3, tmp_path / "stats.json"
    assert sorted(agent.phase.values()) == [0.0, 0.5]  # two meters on one connection take turns
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        deadline = time.monotonic() + 30
        while agent.stats.polls < 12:
            assert not task.done() and time.monotonic() < deadline, f"{agent.stats.polls} polls"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await bank.stop()
    st = json.loads((tmp_path / "stats.json").read_text())
    assert st["polls"] == agent.stats.polls and st["poll_errors"] == 0
    assert sum(st["late_hist"]) == agent.stats.polls  # every poll in the histogram once, the last window at exit
    assert st["late_p99_ms"] >= 0.0 or st["window_polls"] == 0
