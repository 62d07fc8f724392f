"""Node quality on every path of the OPC UA driver, against the real simulator: a point with a Bad
StatusCode is absent from the snapshot and named in ``bad`` (reason ``bad_status``) in the first
Read of a connection, in data changes and polls, and across a server restart; an Uncertain one
keeps its (last usable) value and is named too (``uncertain_status``); both come back when Good.

Before, a Bad point was named in ``bad`` only in the reading where it turned Bad, without a
reason, so nothing downstream could tell an outage of one node from a value that was never sent.
"""

import asyncio
import logging
import re
import time

import pytest

from energy_agent.core.clock import Clock
from energy_agent.core.reading import Availability
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.opcua import CncDriver
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank, NotGood, cnc_events
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

DEMO = scn.load(DEMO_SCENARIO)
SPEED = 40.0
START_S = 120.0  # scenario time when the test starts; m1: J-1001 160-460, J-1002 460-670
FAULTS = [
    # Bad from before the driver connects (the first Read), Good again at 300 (a change)
    {"machine": "m1", "kind": "cnc_bad_status", "point": "program", "status": "BadCommunicationError",
     "from_s": 0.0, "to_s": 300.0},
    # Uncertain: the serial stays SN-0001 (J-1001's) after J-1002 begins with SN-0002 at 460
    {"machine": "m1", "kind": "cnc_bad_status", "point": "serial", "status": "UncertainLastUsableValue",
     "from_s": 320.0, "to_s": 480.0},
    # Bad by a change at 500, still Bad in the first Read after a restart, Good again at 690
    {"machine": "m1", "kind": "cnc_bad_status", "point": "program", "from_s": 500.0, "to_s": 690.0},
    {"machine": "m1", "kind": "cnc_restart", "from_s": 520.0, "to_s": 620.0},
]
END_S = 700.0


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _expected(s: scn.Scenario, upto: float) -> tuple[dict, dict]:
    """What the driver must show at scenario time ``upto``: the usable values (a Bad point absent,
    an Uncertain one with the last value shown before it) and the reason of each point not Good."""
    values, reasons, good = {}, {}, {}
    for t, ch in cnc_events(s, s.machine("m1")):
        if t > upto:
            break
        for q, v in ch.items():
            if isinstance(v, NotGood):
                uncertain = v.status.startswith("Uncertain")
                reasons[q] = "uncertain_status" if uncertain else "bad_status"
                if uncertain:
                    values[q] = good[q]
                else:
                    values.pop(q, None)
            else:
                values[q] = good[q] = v
                reasons.pop(q, None)
    return values, reasons


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_bad_and_uncertain_points_in_every_path_and_back_when_good(mode):
    s = DEMO.with_faults(FAULTS)
    clock = Clock(speed=SPEED, anchor=time.time() - START_S / SPEED)
    bank = CncBank(s, clock, port=free_port())
    nm = load_nodemap("opc40502")
    ids = nm.resolve({"namespace": s.namespace, "channel": "M1.Channel_1", "job": "M1.Job"})
    seen: list[tuple] = []  # (reading, the driver's StatusCode names when it was handed over)
    driver = CncDriver("cnc-1", bank.endpoint, nm, ids, clock, lambda r: seen.append((r, dict(driver.status))),
                       mode=mode, interval_s=0.05 * SPEED, timeout_s=1.0, backoff_min_s=0.2, backoff_max_s=0.5)
    stop = asyncio.Event()
    await bank.start()
    task = asyncio.create_task(driver.run(stop))
    try:
        await _until(lambda: clock.wall() > clock.anchor + END_S, 40, "the end of the faults")
        await _until(lambda: seen[-1][0].values.get("program") == "O1001", 10, "program back")
    finally:
        stop.set()
        await task
        await bank.stop()
    anchor = clock.anchor
    ok = [(r, status) for r, status in seen if r.ok]
    initial = [(r, status) for r, status in ok if r.initial]
    assert len(initial) == 2 and len(seen) - len(ok) == 1  # the first connect, the restart

    # Every reading, whatever brought it: values and bad exactly what the server's statuses say
    for r, _ in ok:
        values, reasons = _expected(s, r.wall - anchor + 1e-6)
        assert r.values == values, (r.wall - anchor, r.values, values)
        assert r.reasons == reasons and set(r.bad) == set(reasons), (r.wall - anchor, r.reasons, reasons)

    # The first Read: Bad with its status, its Bad DataValue's SourceTimestamp in stamps
    first, status = initial[0]
    assert first.wall - anchor < 300.0, "connected only after the first Bad window"
    assert first.bad == ("program",) and "program" not in first.values
    assert status == {"program": "BadCommunicationError"}
    assert abs(first.stamps["program"] - anchor) < 1e-3  # the fault began at scenario time 0
    # Good again by a change, at its instant
    back = next(r for r, _ in ok if "program" in r.values)
    assert abs(back.wall - (anchor + 300.0)) < 1e-3 and back.values["program"] == "O1001"

    # Uncertain: used (the last usable value, not the new job's), flagged, with its status
    flagged = [(r, st) for r, st in ok if "serial" in r.bad]
    assert flagged and all(r.reasons["serial"] == "uncertain_status" and r.values["serial"] == "SN-0001" and
                           st["serial"] == "UncertainLastUsableValue" for r, st in flagged)
    assert any(r.values["job_id"] == "J-1002" for r, _ in flagged)  # the job changed meanwhile
    serial_back = next(r for r, _ in ok if r.wall > flagged[-1][0].wall)
    assert abs(serial_back.wall - (anchor + 480.0)) < 1e-3 and serial_back.values["serial"] == "SN-0002"

    # Bad by a change, through the restart, Good again at 690
    went_bad = next(r for r, _ in ok if r.wall > back.wall and "program" in r.bad)
    assert abs(went_bad.wall - (anchor + 500.0)) < 1e-3
    again, status = initial[1]
    assert 620.0 <= again.wall - anchor < 690.0, "reconnected only after the second Bad window"
    assert again.bad == ("program",) and "program" not in again.values and status == {"program": "BadSensorFailure"}
    came_back = [r for r, _ in ok if r.wall > again.wall and "program" in r.values]
    assert came_back and abs(came_back[0].wall - (anchor + 690.0)) < 1e-3

    # What the caller makes of it: one line per outage of a point (here with back_after=1: a
    # CNC names every point not Good in every reading, so one Good reading ends an outage)
    availability = Availability("cnc cnc-1", back_after=1)
    lines = [line for r, _ in seen for line in availability.update(r, r.wall)]
    assert [(level, re.sub(r" \(.*| after .*", "", text)) for level, text in lines] == [
        (logging.WARNING, "cnc cnc-1: program unavailable"),  # at the first Read
        (logging.INFO, "cnc cnc-1: program back"),  # 300
        (logging.WARNING, "cnc cnc-1: serial uncertain"),  # 320
        (logging.INFO, "cnc cnc-1: serial back"),  # 480
        (logging.WARNING, "cnc cnc-1: program unavailable"),  # 500
        (logging.WARNING, "cnc cnc-1: unavailable"),  # 520: the restart
        (logging.INFO, "cnc cnc-1: back"),  # the first Read after it (program still Bad: no line)
        (logging.INFO, "cnc cnc-1: program back"),  # 690
    ], lines
