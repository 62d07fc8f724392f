"""OPC UA faults against the real simulator: a Bad StatusCode never becomes a value, and a server
that stops publishing (frozen with SIGSTOP) is noticed by the keep-alive watchdog."""

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.callback import CallbackType

from energy_agent.core.clock import Clock
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.opcua import CncDriver
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.serve import READY
from energy_agent.simulators.services import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = scn.load(DEMO_SCENARIO)
SPEED = 20.0
BAD_SPEED = 60.0
BAD_FROM, BAD_TO = 300.0, 600.0  # program O1001 from scenario 160 s (J-1001) to 670 s (end of J-1002)


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _driver(endpoint, clock, readings, **kw):
    nm = load_nodemap("opc40502")
    ids = nm.resolve({"namespace": DEMO.namespace, "channel": "M1.Channel_1", "job": "M1.Job"})
    return CncDriver("cnc-1", endpoint, nm, ids, clock, readings.append, timeout_s=1.0,
                     backoff_min_s=0.2, backoff_max_s=0.5, **kw)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_bad_status_window_is_absent_and_flagged_never_a_value(mode):
    faulty = DEMO.with_faults([{"machine": "m1", "kind": "cnc_bad_status", "point": "program",
                                "from_s": BAD_FROM, "to_s": BAD_TO}])
    clock = Clock(speed=BAD_SPEED, anchor=time.time())  # the window opens 5 s, closes 10 s from now
    bank = CncBank(faulty, clock, port=free_port())
    await bank.start()
    readings = []
    driver = _driver(bank.endpoint, clock, readings, mode=mode, interval_s=0.05 * BAD_SPEED)
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    try:
        await _until(lambda: clock.wall() > clock.anchor + BAD_TO + 15.0, 30, "the end of the Bad window")
        await _until(lambda: readings and readings[-1].values.get("program") == "O1001", 10, "program back")
    finally:
        stop.set()
        await task
        await bank.stop()
    ok = [r for r in readings if r.ok]
    assert ok[0].wall < clock.anchor + BAD_TO, "connected only after the Bad window: nothing to show"
    flagged = [r for r in ok if "program" in r.bad]
    assert flagged, "the Bad status was never reported"
    assert all("program" not in r.values and r.reasons["program"] == "bad_status" for r in flagged)
    # From the first Bad reading to the next Good one, no snapshot holds a program, although the
    # server keeps sending the last value ("O1001") inside the Bad DataValue.
    first = ok.index(flagged[0])
    back = next(i for i in range(first, len(ok)) if "program" in ok[i].values)
    assert all("program" not in r.values and "program" in r.bad for r in ok[first:back])  # named in every one
    assert "program" not in ok[back].bad and not ok[back].reasons
    assert ok[back].values["program"] == "O1001"
    assert all(r.values.get("job_id") for r in ok[first:back])  # other points keep their values
    if mode == "subscribe":  # changes carry the instants the simulator gave them
        assert abs(ok[back].wall - (clock.anchor + BAD_TO)) < 1e-3
    if ok[0].wall < clock.anchor + BAD_FROM:  # connected before the window: seen opening, too
        assert "program" in ok[first - 1].values
        if mode == "subscribe":
            assert abs(flagged[0].wall - (clock.anchor + BAD_FROM)) < 1e-3


async def test_a_job_end_written_while_the_driver_connects_is_never_seen_in_halves():
    # J-1002 is processing (scenario 600 s of 460-670); its end (670 s: channel reset, job id
    # cleared, parts counter up) is written the moment the server has answered the driver's
    # first read of the channel status. Read node by node, the rest of that first snapshot would
    # come from after the end: the state of a running job with the parts counter of a finished
    # one, which the tracker took for a new job. Read in one request, the snapshot is whole.
    clock = Clock(speed=1.0, anchor=time.time() - 600.0)
    bank = CncBank(DEMO, clock, port=free_port())
    (end,) = [changed for t, changed in bank.events["m1"] if t == 670.0]
    ended = asyncio.Event()

    async def end_the_job_after_the_first_status_read(event, _dispatcher):
        if ended.is_set() or not any(rv.NodeId == status_node and rv.AttributeId == ua.AttributeIds.Value
                                     for rv in event.request_params.NodesToRead):
            return
        ended.set()
        stamp = datetime.now(timezone.utc)
        for q, v in end.items():
            await bank._write("m1", q, v, stamp)

    readings = []
    stop = asyncio.Event()
    task = None
    await bank.start()
    try:
        status_node = bank.nodes["m1"]["channel_status"]
        bank.server.subscribe_server_callback(CallbackType.PostRead, end_the_job_after_the_first_status_read)
        task = asyncio.create_task(_driver(bank.endpoint, clock, readings, interval_s=0.5).run(stop))
        await _until(lambda: any(r.values.get("parts_total") == end["parts_total"] for r in readings), 15,
                     "the job's end")
    finally:
        stop.set()
        if task is not None:
            await task
        await bank.stop()
    assert ended.is_set()
    ok = [r for r in readings if r.ok]
    before = {"channel_status": 0, "job_id": "J-1002", "parts_total": 1}
    assert {q: ok[0].values.get(q) for q in before} == before  # read whole, before the end
    for r in ok:
        seen = {q: r.values.get(q) for q in end}
        assert seen == end or {q: seen[q] for q in before} == before, f"half an instant: {seen}"


def _simulate(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "energy_agent.simulators.serve", str(DEMO_SCENARIO), "--modbus-port", "0",
         "--opcua-port", str(port), "--speed", str(SPEED)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    line = proc.stdout.readline()  # blocks until ready (or the process ends)
    assert line.startswith(READY), (line, proc.poll())
    return proc


async def test_frozen_server_trips_the_keepalive_watchdog_and_the_driver_recovers(caplog):
    caplog.set_level(logging.WARNING, logger="asyncua")
    caplog.set_level(logging.INFO, logger="energy_agent.drivers.opcua")  # last: sets the handler's level
    port = free_port()
    proc = _simulate(port)
    clock = Clock(speed=SPEED, anchor=time.time())
    readings = []
    driver = _driver(f"opc.tcp://127.0.0.1:{port}", clock, readings, interval_s=0.1 * SPEED,
                     watchdog_intervals=10)
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    frozen = False
    try:
        await _until(lambda: driver.subscribed and readings, 15, "the subscription")
        os.kill(proc.pid, signal.SIGSTOP)  # the process stays, its socket stays open: only silence
        frozen = True
        await _until(lambda: not driver.available, 20, "the silence to be noticed")
        os.kill(proc.pid, signal.SIGCONT)
        frozen = False
        await _until(lambda: driver.available, 20, "recovery")
    finally:
        if frozen:
            os.kill(proc.pid, signal.SIGCONT)
        stop.set()
        await task
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.message]
    backs = [r.message for r in caplog.records if "back after" in r.message]
    assert len(warnings) == 1 and len(backs) == 1, (warnings, backs)
    assert "silent" in warnings[0] and "keep-alive" in warnings[0]
    assert driver.watchdog_trips == 1
    assert sum(1 for r in readings if not r.ok) == 1
    # The silence is the driver's to notice: asyncua's own stale-subscription check (recreate,
    # then reconnect, with a traceback) must not race it.
    lib = [r for r in caplog.records if r.name.startswith("asyncua")]
    assert not [r.getMessage() for r in lib if "stale" in r.getMessage() or r.exc_info], lib
