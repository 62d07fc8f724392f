"""A CNC server restarts while a job ends and the next begins: the driver hands over the restarted
server's state as ONE initial snapshot, stamped at its receipt, with each value's SourceTimestamp
in ``stamps``; the namespace moved to another index and is found again by its URI.

Before, the snapshot of a reconnect was applied value by value at the values' own
SourceTimestamps, so a reading held the new parts counter with the old job id and state: a job
ended on the parts rise and reopened under the same key (an extra, unflagged record).
"""

import asyncio
import math
import time
from datetime import timezone

import pytest
from asyncua import Client, ua

from energy_agent.core.clock import Clock
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.opcua import CncDriver, read_values, resolve_node_id
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank, cnc_events
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port
from tests.factories import until

DEMO = scn.load(DEMO_SCENARIO)
SPEED = 20.0
START_S = 520.0  # scenario time when the test starts: J-1002 processing (460-670)
DOWN_S = (650.0, 760.0)  # J-1002 ends at 670 (parts 1 -> 2, job id cleared), J-1003 starts at 740 (setup)
NEXT_S = 785.0  # J-1003: setup -> processing, the first change after the restart


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _scenario(node_map: str) -> scn.Scenario:
    data = DEMO.model_dump()
    if node_map == "opc40501":
        data["machines"][0]["cnc"] = {"node_map": "opc40501", "channel": "Channel1", "job": "Job"}
    data["faults"] = [{"machine": "m1", "kind": "cnc_restart", "from_s": DOWN_S[0], "to_s": DOWN_S[1]}]
    return scn.Scenario.model_validate(data)


def _shown(s: scn.Scenario, upto: float) -> tuple[dict, dict]:
    """What m1's simulated CNC shows at scenario time ``upto``: each point's value and the
    scenario time it last changed (-inf: never)."""
    values, changed = {}, {}
    for t, ch in cnc_events(s, s.machine("m1")):
        if t > upto:
            break
        for q, v in ch.items():
            values[q], changed[q] = v, t
    return values, changed


@pytest.mark.parametrize("node_map, mode", [("opc40502", "subscribe"), ("opc40501", "poll")],
                         ids=["nsu-ids-subscribe", "browse-paths-poll"])
async def test_a_restart_over_a_job_end_is_one_initial_snapshot_of_the_new_state(node_map, mode):
    s = _scenario(node_map)
    clock = Clock(speed=SPEED, anchor=time.time() - START_S / SPEED)
    bank = CncBank(s, clock, port=free_port())
    nm = load_nodemap(node_map)
    m1 = s.machine("m1")
    params = {"namespace": s.namespace, "channel": m1.cnc.channel, "job": m1.cnc.job, "machine": "m1"}
    readings = []
    driver = CncDriver("cnc-1", bank.endpoint, nm, nm.resolve({k: params[k] for k in nm.params}), clock,
                       readings.append, mode=mode, interval_s=0.05 * SPEED, timeout_s=1.0,
                       backoff_min_s=0.2, backoff_max_s=0.5)
    stop = asyncio.Event()
    await bank.start()
    index_before = bank.namespace_index
    task = asyncio.create_task(driver.run(stop))
    try:
        await _until(lambda: readings, 15, "the first snapshot")
        resolved_before = dict(driver.resolved)
        await _until(lambda: any(not r.ok for r in readings), 20, "the server to stop")
        await _until(lambda: sum(r.initial for r in readings) == 2, 20, "the reconnection")
        await _until(lambda: clock.wall() > clock.anchor + NEXT_S + 5.0, 20, "the change after the restart")
        await _until(lambda: readings[-1].wall > clock.anchor + NEXT_S - 1e-3, 5, "the change after the restart")
    finally:
        stop.set()
        await task
        await bank.stop()
    anchor = clock.anchor
    assert readings[0].initial and readings[0].wall < anchor + DOWN_S[0], "connected only after the restart began"
    (k_error,) = [k for k, r in enumerate(readings) if not r.ok]
    again = readings[k_error + 1]
    assert [k for k, r in enumerate(readings) if r.initial] == [0, k_error + 1]  # one per connection

    # The namespace moved; the node ids (nsu= or browse paths) were resolved anew by URI.
    assert bank.restart_count == 1 and bank.namespace_index != index_before
    assert set(driver.resolved) == set(resolved_before) == set(nm.points)
    assert driver.resolved != resolved_before
    if node_map == "opc40502":
        assert all(n.startswith(f"ns={bank.namespace_index};") for n in driver.resolved.values())

    # One reading holds the restarted server's state, all of it, stamped at receipt ...
    read_at = again.wall - anchor
    assert DOWN_S[1] <= read_at < NEXT_S, read_at
    values, changed = _shown(s, read_at)
    assert again.values == {q: values[q] for q in nm.points} and again.bad == ()
    assert again.values["job_id"] == "J-1003" and again.values["parts_total"] == 2
    # ... with each value's SourceTimestamp: when it last changed, the job end during the outage included
    assert all(math.isfinite(changed[q]) for q in nm.points)
    for q in nm.points:
        assert abs(again.stamps[q] - (anchor + changed[q])) < 1e-3, q
    assert abs(again.stamps["parts_total"] - (anchor + 670.0)) < 1e-3  # J-1002's end, unseen
    assert abs(again.stamps["job_id"] - (anchor + 740.0)) < 1e-3  # J-1003's start, unseen
    assert again.wall >= max(again.stamps.values())

    # The subscription's (or first poll's) repeat of the values read is no news: the next
    # reading is the next change, at its own instant.
    after = readings[k_error + 2]
    assert abs(after.wall - (anchor + NEXT_S)) < 1e-3 and not after.initial
    assert after.values == {q: _shown(s, NEXT_S)[0][q] for q in nm.points}
    assert abs(after.stamps["job_id"] - (anchor + 740.0)) < 1e-3  # unchanged point, unchanged stamp
    # Every reading carries the stamps of all points.
    assert all(set(r.stamps) == set(nm.points) for r in readings if r.ok)


class ManualClock:
    """Scenario time set by the test (duck-typed Clock for the simulator)."""

    def __init__(self, t: float):
        self.anchor, self.t = 1_800_000_000.0, t

    def wall(self) -> float:
        return self.anchor + self.t


async def _read_m1(endpoint: str, s: scn.Scenario) -> tuple[int, dict, dict, dict]:
    """The scenario namespace's index, and m1's node ids (resolved by URI), values and
    SourceTimestamps (scenario seconds)."""
    m1 = s.machine("m1")
    ids = m1.cnc.node_map_model.resolve({"namespace": s.namespace, "channel": m1.cnc.channel, "job": m1.cnc.job})
    async with Client(endpoint, timeout=5) as client:
        index = await client.get_namespace_index(s.namespace)
        nodes = {q: client.get_node(await resolve_node_id(client, text)) for q, text in ids.items()}
        dvs = await read_values(client, list(nodes.values()))
    return (index, {q: n.nodeid.to_string() for q, n in nodes.items()}, {q: dv.Value.Value for q, dv in zip(nodes, dvs)},
            {q: dv.SourceTimestamp.replace(tzinfo=timezone.utc).timestamp() for q, dv in zip(nodes, dvs)})


async def test_the_simulated_restart_moves_the_namespace_and_keeps_each_value_s_last_change():
    """At the scenario level, with a clock the test sets: the server is down in [120, 200); J-1001
    starts at 160, meanwhile. After the restart the namespace has another index (the old node
    ids name nothing), ``nsu=`` ids resolve to the new one, the values are those of now and each
    carries the instant it last changed: J-1001's start for what it changed, the first serving
    for what never changed (the same stamp as before the restart)."""
    s = DEMO.with_faults([{"machine": "m2", "kind": "cnc_restart", "from_s": 120.0, "to_s": 200.0}])
    clock = ManualClock(t=100.0)
    bank = CncBank(s, clock, port=free_port())
    await bank.start()
    try:
        index, ids, values, stamps = await _read_m1(bank.endpoint, s)
        timeline = s.machine("m1").timeline
        assert values == timeline.cnc_values(100.0) and set(stamps.values()) == {clock.anchor + 100.0}
        clock.t = 150.0
        await until(lambda: not bank.serving, 10.0, "the server to stop")
        with pytest.raises(OSError):
            await _read_m1(bank.endpoint, s)
        clock.t = 210.0
        await until(lambda: bank.serving, 15.0, "the server to serve again")
        index2, ids2, values2, stamps2 = await _read_m1(bank.endpoint, s)
        async with Client(bank.endpoint, timeout=5) as client:
            old = await client.get_node(ids["job_id"]).read_data_value(raise_on_bad_status=False)
    finally:
        await bank.stop()
    assert bank.restart_count == 1 and index2 == bank.namespace_index != index
    assert all(n.startswith(f"ns={index2};") for n in ids2.values())
    assert old.StatusCode.value == ua.StatusCodes.BadNodeIdUnknown  # the old index names nothing now
    assert values2 == timeline.cnc_values(210.0) and values2["job_id"] == "J-1001"
    for q in values2:
        changed = values2[q] != values[q]
        assert stamps2[q] == clock.anchor + (160.0 if changed else 100.0), q
    assert {q for q in values2 if values2[q] != values[q]} >= {"job_id", "program", "channel_status"}
    # One server serves every CNC: the truth lists the restart for the jobs of every machine it touches.
    touched = {(j["machine"], j["job_id"]) for j in scn.truth(s) if any(f["kind"] == "cnc_restart" for f in j["faults"])}
    assert touched == {("m1", "J-1001"), ("m2", "J-2001")}
