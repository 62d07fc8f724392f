"""The publisher drains the ledger's outbox to a real broker and survives a broker outage."""

import asyncio
import contextlib
import json
import time
from types import SimpleNamespace

from energy_agent.core.record import parse_record
from energy_agent.delivery.mqtt import MqttClient
from energy_agent.delivery.outbox import Publisher
from energy_agent.records.ledger import Ledger
from energy_agent.simulators.services import Mosquitto
from tests import factories


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _outbox_to_broker(tmp_path, sub_id: str, pub_id: str, *, clean_start: bool, **pub_options):
    """A broker, a ledger, a subscriber on energy/v1/# and a connected publishing client;
    ``task`` (the publisher's, if the test starts one) is stopped by ``stop`` at the end."""
    broker = Mosquitto().start(tmp_path / "broker")
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    ctx = SimpleNamespace(
        broker=broker, ledger=ledger, stop=asyncio.Event(), task=None,
        sub=MqttClient(host="127.0.0.1", port=broker.port, client_id=sub_id, clean_start=clean_start),
        pub=MqttClient(host="127.0.0.1", port=broker.port, client_id=pub_id, **pub_options))
    try:
        await ctx.sub.connect(5)
        await ctx.sub.subscribe("energy/v1/#", qos=1)
        await ctx.pub.connect(5)
        yield ctx
    finally:
        ctx.stop.set()
        if ctx.task is not None:
            await ctx.task
        await ctx.pub.close()
        await ctx.sub.close()
        await ledger.close()
        broker.stop()


async def test_outbox_drains_and_survives_a_broker_outage(tmp_path):
    async with _outbox_to_broker(tmp_path, "lca-consumer", "agent-under-test", clean_start=False) as c:
        ledger, sub, broker = c.ledger, c.sub, c.broker
        publisher = Publisher(ledger, c.pub, topic_prefix="energy/v1", max_inflight=50)
        c.task = asyncio.create_task(publisher.run(c.stop))
        await factories.fill(ledger, "m1", 40, site="s", agent="a")
        publisher.notify()
        await _until(lambda: _pending_is(ledger, 0), 10, "the first 40 records sent")

        broker.stop()  # outage: records keep coming and stay in the outbox
        await factories.fill(ledger, "m1", 25, first=41, site="s", agent="a")
        publisher.notify()
        await asyncio.sleep(0.5)
        assert await ledger.pending() == 25  # nothing marked sent without a PUBACK

        broker.restart()  # same port, persistent sessions kept
        await _until(lambda: _pending_is(ledger, 0), 30, "the backlog drained after the outage")
        seen = set()
        while len(seen) < 65:
            m = await sub.next_message(timeout=10)
            assert m is not None, f"consumer got {len(seen)} of 65"
            rec = parse_record(m.payload)
            assert m.topic == "energy/v1/s/a/m1/record" and rec.hash == rec.body_hash()
            seen.add(rec.seq)
        assert seen == set(range(1, 66))


async def _pending_is(ledger, n):
    return await ledger.pending() == n


async def test_a_batch_and_a_publish_after_it_arrive_in_order(tmp_path):
    broker = Mosquitto().start(tmp_path / "broker")
    sub = MqttClient(host="127.0.0.1", port=broker.port, client_id="batch-consumer")
    pub = MqttClient(host="127.0.0.1", port=broker.port, client_id="batch-publisher")
    try:
        await sub.connect(5)
        await sub.subscribe("t/#", qos=1)
        await pub.connect(5)
        results = await pub.publish_many([("t/batch", str(k).encode()) for k in range(300)])
        assert results == [None] * 300
        await pub.publish("t/single", b"after")
        got = []
        while len(got) < 301:
            m = await sub.next_message(timeout=10)
            assert m is not None, f"subscriber got {len(got)} of 301"
            got.append(m.payload)
        assert got == [str(k).encode() for k in range(300)] + [b"after"]
    finally:
        await pub.close()
        await sub.close()
        broker.stop()


async def test_overlapping_batches_send_every_record_once_in_outbox_order(tmp_path):
    # Small batches and few messages in flight: the next batch is read and sent while the last
    # one still awaits PUBACKs, never containing its rows again.
    async with _outbox_to_broker(tmp_path, "order-consumer", "order-agent", clean_start=True, max_inflight=10) as c:
        ledger, sub = c.ledger, c.sub
        await factories.fill(ledger, "m1", 300, site="s", agent="a")
        publisher = Publisher(ledger, c.pub, topic_prefix="energy/v1", max_inflight=10, batch=25)
        c.task = asyncio.create_task(publisher.run(c.stop))
        await _until(lambda: _pending_is(ledger, 0), 30, "the outbox drained")
        seqs = []
        while len(seqs) < 300:
            m = await sub.next_message(timeout=10)
            assert m is not None, f"consumer got {len(seqs)} of 300"
            seqs.append(json.loads(m.payload)["seq"])
        assert seqs == list(range(1, 301))
        assert await sub.next_message(timeout=0.5) is None  # nothing twice
        assert publisher.sent == 300
