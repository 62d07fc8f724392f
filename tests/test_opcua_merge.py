"""The OPC UA driver merges the changes of one instant into one snapshot."""

import asyncio
from datetime import datetime, timezone

from energy_agent.core.clock import Clock
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.opcua import BAD, WRITE_SPREAD_S, Change, CncDriver


def _driver(readings):
    nm = load_nodemap("opc40502")
    ids = nm.resolve({"namespace": "urn:x", "channel": "C", "job": "J"})
    return CncDriver("cnc", "opc.tcp://127.0.0.1:1", nm, ids, Clock(), readings.append, interval_s=0.02)


async def test_instant_split_over_two_notifications_is_one_snapshot():
    readings = []
    d = _driver(readings)
    clock = Clock()
    t = datetime.fromtimestamp(clock.wall() - 0.01, timezone.utc)
    # Same SourceTimestamp, two notifications: the state first, the job id a publish later.
    d._apply([Change("channel_status", 0, t), Change("program_status", 1, t)])
    await asyncio.sleep(0.005)
    d._apply([Change("job_id", "J-7", t), Change("parts_total", 3, t)])
    assert readings == []  # the instant may still grow
    deadline = asyncio.get_running_loop().time() + 2
    while not readings and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    (r,) = readings
    assert r.values == {"channel_status": 0, "program_status": 1, "job_id": "J-7", "parts_total": 3}


async def test_a_later_instant_releases_the_earlier_one_in_order():
    readings = []
    d = _driver(readings)
    w = Clock().wall()
    t1 = datetime.fromtimestamp(w - 0.5, timezone.utc)
    t2 = datetime.fromtimestamp(w - 0.2, timezone.utc)
    d._apply([Change("job_id", "A", t1), Change("job_id", "B", t2), Change("parts_total", 1, t2)])
    assert [r.values for r in readings] == [{"job_id": "A"}]
    d._flush()
    assert [r.values for r in readings] == [{"job_id": "A"}, {"job_id": "B", "parts_total": 1}]
    assert readings[0].t < readings[1].t
    assert abs(readings[1].wall - t2.timestamp()) < 1e-3  # stamped at the source time


async def test_a_bad_status_removes_the_value_and_is_reported():
    readings = []
    d = _driver(readings)
    t = datetime.fromtimestamp(Clock().wall() - 0.1, timezone.utc)
    d._apply([Change("program", "O1", t)])
    d._flush()
    d._apply([Change("program", "O1", None, BAD, "BadCommunicationError")])
    d._flush()
    assert readings[-1].values == {} and readings[-1].bad == ("program",)
    assert readings[-1].reasons == {"program": "bad_status"} and d.status == {"program": "BadCommunicationError"}
    assert readings[-1].stamps == {}  # the Bad value came without a SourceTimestamp


async def test_a_change_that_is_no_news_is_dropped():
    """The first notification of a monitored item repeats the value just read; an unchanged
    value polled again is the same: neither is an instant."""
    readings = []
    d = _driver(readings)
    t = datetime.fromtimestamp(Clock().wall() - 0.1, timezone.utc)
    d._apply([Change("program", "O1", t), Change("job_id", "J-1", t)])
    d._flush()
    d._apply([Change("program", "O1", t), Change("job_id", "J-1", t)])
    d._flush()
    assert len(readings) == 1 and d._flush_timer is None


async def test_settle_zero_hands_over_at_the_end_of_each_notification_batch():
    readings = []
    nm = load_nodemap("opc40502")
    ids = nm.resolve({"namespace": "urn:x", "channel": "C", "job": "J"})
    d = CncDriver("cnc", "opc.tcp://127.0.0.1:1", nm, ids, Clock(), readings.append, interval_s=0.5, settle_s=0)
    t = datetime.fromtimestamp(Clock().wall() - 0.01, timezone.utc)
    d._apply([Change("channel_status", 0, t), Change("job_id", "J-7", t)])
    assert [r.values for r in readings] == [{"channel_status": 0, "job_id": "J-7"}]  # no quiet period
    d._apply([Change("parts_total", 3, t)])  # the same instant, a publish later: its own snapshot
    assert readings[-1].values == {"channel_status": 0, "job_id": "J-7", "parts_total": 3}
    assert readings[-1].t >= readings[0].t and d._flush_timer is None


async def test_a_publish_built_after_the_write_spread_completes_the_instant():
    readings = []
    d = _driver(readings)
    assert d.by_publish_time
    now = Clock().wall()
    t = datetime.fromtimestamp(now - 0.2, timezone.utc)
    d._apply([Change("job_id", "J-1", t, received=now - 0.19), Change("parts_total", 2, t, received=now - 0.18)])
    d._published(now - 0.19 + WRITE_SPREAD_S * 0.9)  # built while the server may still be writing
    assert readings == []
    d._published(now - 0.19 + WRITE_SPREAD_S * 1.1)  # the first value's receipt is what counts
    assert [r.values for r in readings] == [{"job_id": "J-1", "parts_total": 2}]
    assert d.settled == {"publish": 1, "quiet": 0}


async def test_an_instant_without_a_server_time_of_its_own_waits_for_quiet():
    readings = []
    d = _driver(readings)
    now = Clock().wall()
    t = datetime.fromtimestamp(now - 0.2, timezone.utc)
    # ServerTimestamp equal to SourceTimestamp: maybe a copy of the device's clock, not the server's
    d._apply([Change("job_id", "J-1", t, received=t.timestamp()), Change("parts_total", 2, t, received=now - 0.19)])
    d._published(now + 10.0)
    d._apply([Change("program", "O1", datetime.fromtimestamp(now - 0.1, timezone.utc))])  # no server time
    assert [r.values for r in readings] == [{"job_id": "J-1", "parts_total": 2}]  # by the later instant
    d._published(now + 10.0)
    assert len(readings) == 1 and d.settled == {"publish": 0, "quiet": 0}
