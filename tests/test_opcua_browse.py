"""Browse-path addressing against the real simulator: paths resolved at connect and again after a
reconnect, namespace URIs instead of indexes, clear errors, and the OPC 40501 machine tool layout."""

import asyncio
import logging
import time

import pytest

from energy_agent.core.clock import Clock
from energy_agent.core.errors import ConfigError
from energy_agent.drivers.nodemap import NodeMap, load_nodemap
from energy_agent.drivers.opcua import CncDriver
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)
SPEED = 40.0
RULES = [{"when": {"channel_status": 1}, "state": "interrupted"},
         {"when": {"channel_status": 0, "program_status": 1}, "state": "processing"},
         {"when": {"channel_status": 0}, "state": "setup"}, {"state": "ready"}]


def _map(points: dict) -> NodeMap:
    """A node map over the simulator's OPC 40502 layout (Objects/<machine>/Channel_1/…, Job/…)
    that addresses nodes by browse names only."""
    return NodeMap.model_validate({
        "name": "browse-test", "params": {"namespace": "URI of the instance nodes"},
        "namespaces": {"sim": "{namespace}"}, "points": points, "states": RULES,
        "job": {"key": ["job_id", "program"]}})


BROWSE = {
    "channel_status": {"path": "Objects/sim:m1/sim:Channel_1/sim:ActStatus"},
    "program_status": {"path": "Objects/sim:m1/sim:Channel_1/sim:ActProgramStatus"},
    # relative to a configured object, namespace URIs written out, as a list of elements
    "program": {"start": "nsu={namespace};s=m1", "path": ["nsu={namespace};Channel_1", "nsu={namespace};ActMainProgramName"]},
    "job_id": {"path": "Objects/sim:m1/sim:Job/sim:Identifier"},
    "parts_total": {"path": "Objects/sim:m1/sim:Job/sim:RunsCompleted"},
}


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _driver(nm: NodeMap, params: dict, endpoint: str, clock: Clock, readings: list) -> CncDriver:
    return CncDriver("cnc-1", endpoint, nm, nm.resolve(params), clock, readings.append, interval_s=0.05 * SPEED,
                     timeout_s=1.0, backoff_min_s=0.2, backoff_max_s=0.5)


def _renamed(channel: str, job: str) -> scn.Scenario:
    """The demo with m1's objects under other node ids (same browse names)."""
    data = DEMO.model_dump()
    data["machines"][0]["cnc"].update(channel=channel, job=job)
    return scn.Scenario.model_validate(data)


async def test_paths_resolve_at_connect_and_again_after_a_reconnect(caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.opcua")
    clock = Clock(speed=SPEED, anchor=time.time() - 100.0 / SPEED)
    port = free_port()
    nm = _map(BROWSE)
    readings: list = []
    driver = _driver(nm, {"namespace": DEMO.namespace}, f"opc.tcp://127.0.0.1:{port}", clock, readings)
    bank = CncBank(DEMO, clock, port=port)
    await bank.start()
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    try:
        await _until(lambda: driver.available and readings, 10, "first snapshot")
        first = dict(driver.resolved)
        await bank.stop()
        await _until(lambda: not driver.available, 10, "the outage")
        # The CNC comes back with a rebuilt address space: other node ids, the same browse names.
        bank = CncBank(_renamed("Cell7.M1.Channel_1", "Cell7.M1.Job"), clock, port=port)
        await bank.start()
        await _until(lambda: driver.available, 15, "reconnection")
        await _until(lambda: any(r.ok and r.values.get("job_id") == "J-1001" for r in readings), 15, "J-1001")
    finally:
        stop.set()
        await task
        await bank.stop()
    second = driver.resolved
    assert set(first) == set(second) == set(BROWSE)
    assert all(first[q] != second[q] for q in ("channel_status", "program", "job_id"))
    assert "Cell7.M1.Channel_1.ActStatus" in second["channel_status"]
    last = readings[-1]  # read through the re-resolved nodes
    assert last.ok and last.values["program"] == "O1001" and last.values["channel_status"] in (0, 1)


async def test_a_path_that_does_not_resolve_names_the_device_and_the_path(caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.opcua")
    clock = Clock(speed=SPEED, anchor=time.time())
    points = dict(BROWSE, serial={"path": "Objects/sim:m1/sim:Job/sim:NoSuchSerial", "optional": True})
    bank = CncBank(DEMO, clock, port=free_port())
    await bank.start()
    try:
        readings: list = []
        driver = _driver(_map(points), {"namespace": DEMO.namespace}, bank.endpoint, clock, readings)
        stop = asyncio.Event()
        task = asyncio.create_task(driver.run(stop))
        await _until(lambda: readings, 10, "a snapshot")
        stop.set()
        await task
        assert readings[0].ok and "serial" not in driver.resolved  # optional: left out, logged
        assert any("optional point serial" in r.message and "NoSuchSerial" in r.message for r in caplog.records)

        points = dict(BROWSE, program={"path": "Objects/sim:m1/sim:Channel_9/sim:ActMainProgramName"})
        readings = []
        driver = _driver(_map(points), {"namespace": DEMO.namespace}, bank.endpoint, clock, readings)
        stop = asyncio.Event()
        task = asyncio.create_task(driver.run(stop))
        await _until(lambda: readings, 10, "the error")
        stop.set()
        await task
    finally:
        await bank.stop()
    (err,) = [r.error for r in readings]
    assert err.startswith("cnc-1: browse path Objects/") and "Channel_9/" in err and "'program'" in err
    assert "BadNoMatch" in err
    assert not driver.available


def test_node_map_path_errors_name_the_point():
    with pytest.raises(ValueError, match=r"points\.program\.path: element 'xx:Name': unknown namespace alias 'xx'"):
        _map(dict(BROWSE, program={"path": "Objects/xx:Name"}))
    with pytest.raises(ValueError, match="give node or path"):
        _map(dict(BROWSE, program={"node": "ns=2;s=P", "path": "Objects/P"}))
    with pytest.raises(ValueError, match="only a path takes a start node"):
        _map(dict(BROWSE, program={"node": "ns=2;s=P", "start": "i=85"}))
    with pytest.raises(ConfigError, match="node map 'missing-map' not found"):
        load_nodemap("missing-map")


async def test_opc40501_layout_tracks_a_job_through_its_browse_paths():
    data = DEMO.model_dump()
    data["machines"][0]["cnc"] = {"node_map": "opc40501", "channel": "Channel1", "job": "Job"}
    s = scn.Scenario.model_validate(data)
    jobs = s.machine("m1").jobs[:2]  # J-1001 (setup, then processing), J-1002 back to back, then idle
    clock = Clock(speed=SPEED, anchor=time.time())  # J-1002 starts 11.5 s from now
    bank = CncBank(s, clock, port=free_port())
    await bank.start()
    nm = load_nodemap("opc40501")
    readings: list = []
    driver = _driver(nm, {"namespace": s.namespace, "machine": "m1", "channel": "Channel1"}, bank.endpoint,
                     clock, readings)
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    try:
        await _until(lambda: clock.wall() > clock.anchor + jobs[1].end_s + 10, 40, "J-1002 to end")
        await _until(lambda: readings and readings[-1].values.get("parts_total") == jobs[0].parts + jobs[1].parts,
                     10, "the parts of J-1002")
    finally:
        stop.set()
        await task
        await bank.stop()
    assert all(str(ref).startswith("Objects/nsu=http://opcfoundation.org/UA/Machinery/;Machines/")
               for ref in nm.resolve({"namespace": s.namespace, "machine": "m1", "channel": "Channel1"}).values())
    assert set(driver.resolved) == set(nm.points)
    track = []  # (scenario time, state, job key, parts) at every change of state or key
    for r in readings:
        if not r.ok:
            continue
        key = next((str(r.values[k]) for k in nm.job.key if r.values.get(k)), None)
        row = (nm.state_of(dict(r.values)), key, r.values.get("parts_total"))
        if not track or track[-1][1:] != row:
            track.append((round(r.wall - clock.anchor, 3), *row))
    assert readings[0].wall < clock.anchor + jobs[1].start_s, "connected after J-1002 started: nothing to track"
    # J-1002 starts back to back with J-1001 (the job id changes, a part is counted) and ends when
    # the channel is reset with another part counted; each at the instant the simulator set it.
    parts = jobs[0].parts + jobs[1].parts
    assert (jobs[1].start_s, "processing", jobs[1].job_id, jobs[0].parts) in track, track
    assert (jobs[1].end_s, "ready", jobs[1].program, parts) in track, track
    processing_at = jobs[0].start_s + jobs[0].phases[0][1]
    if readings[0].wall < clock.anchor + processing_at:  # connected in J-1001's setup: seen too
        assert (processing_at, "processing", jobs[0].job_id, 0) in track, track
