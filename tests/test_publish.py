"""The publisher drains the ledger's outbox to a real broker and survives a broker outage."""

import asyncio
import json
import time
from types import SimpleNamespace

from agent import record
from agent.config import EmissionFactor, MeterDevice
from agent.ledger import Ledger
from agent.mqtt import MqttClient
from agent.publish import Publisher
from simulators.services import Mosquitto

FACTOR = EmissionFactor(value=0.6592, authority="MONRE DCC", document="notice", region="VN", year=2023,
                        basis="location")
METER = MeterDevice(id="pm-1", host="127.0.0.1", profile="eastron-sdm630")


def _job(i):
    energy = SimpleNamespace(kwh=0.1 * i, estimated_kwh=0.0, method="counter", kwh_by_state=(0, 0, 0, 0.1 * i, 0, 0),
                             coverage=1.0, gap_count=0, longest_gap_s=0.0, counter_resets=0, counter_rollovers=0,
                             counter_jumps=0)
    info = SimpleNamespace(key=f"J-{i}", job_id=f"J-{i}", program="O1", product=None, serial=None, subassembly=None,
                           start=0.0, start_wall=1_790_000_000.0 + 100 * i)
    return SimpleNamespace(machine="m1", info=info, end=10.0, end_wall=1_790_000_010.0 + 100 * i,
                           end_reason="key_cleared", parts=None, energy=energy, samples=10, bad_samples=0,
                           median_interval_s=1.0, flags=())


async def _append(ledger, first, n):
    for i in range(first, first + n):
        await ledger.append("m1", lambda seq, prev, i=i: record.build(
            site="s", agent="a", seq=seq, prev_hash=prev, job=_job(i), factor_id="vn-2023", factor=FACTOR,
            meter=METER, profile="eastron-sdm630", cnc=None, config_hash="c" * 64))


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_outbox_drains_and_survives_a_broker_outage(tmp_path):
    broker = Mosquitto().start(tmp_path / "broker")
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    sub = MqttClient(host="127.0.0.1", port=broker.port, client_id="lca-consumer", clean_start=False)
    pub = MqttClient(host="127.0.0.1", port=broker.port, client_id="agent-under-test")
    stop = asyncio.Event()
    task = None
    try:
        await sub.connect(5)
        await sub.subscribe("energy/v1/#", qos=1)
        await pub.connect(5)
        publisher = Publisher(ledger, pub, topic_prefix="energy/v1", max_inflight=50)
        task = asyncio.create_task(publisher.run(stop))
        await _append(ledger, 1, 40)
        publisher.notify()
        await _until(lambda: _pending_is(ledger, 0), 10, "the first 40 records sent")

        broker.stop()  # outage: records keep coming and stay in the outbox
        await _append(ledger, 41, 25)
        publisher.notify()
        await asyncio.sleep(0.5)
        assert await ledger.pending() == 25  # nothing marked sent without a PUBACK

        broker.restart()  # same port, persistent sessions kept
        await _until(lambda: _pending_is(ledger, 0), 30, "the backlog drained after the outage")
        seen = set()
        while len(seen) < 65:
            m = await sub.next_message(timeout=10)
            assert m is not None, f"consumer got {len(seen)} of 65"
            rec = json.loads(m.payload)
            assert m.topic == "energy/v1/s/a/m1/record" and rec["hash"] == record.record_hash(rec)
            seen.add(rec["seq"])
        assert seen == set(range(1, 66))
    finally:
        stop.set()
        if task is not None:
            await task
        await pub.close()
        await sub.close()
        await ledger.close()
        broker.stop()


async def _pending_is(ledger, n):
    return await ledger.pending() == n
