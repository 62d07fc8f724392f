"""energy_agent.delivery.mqtt against a real Mosquitto: bursts through paho's in-flight window, bulk
manual acks, acks that must not cross a reconnect, and a connection lost under paho's feet.

Not tested here: a message whose topic is not valid UTF-8. Mosquitto (like the MQTT spec asks)
closes the connection of a client that publishes one and passes nothing on, so no real broker
delivers it; MqttClient drops such a message with a log line should one arrive."""

import asyncio
import logging
import random
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from energy_agent.delivery.mqtt import MqttClient
from energy_agent.simulators.services import Mosquitto
from tests.factories import until


async def _receive(sub: MqttClient, n: int) -> list:
    got = []
    while len(got) < n:
        m = await sub.next_message(timeout=10)
        assert m is not None, f"{sub.client_id} got {len(got)} of {n}"
        got.append(m)
    return got


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_large_batch_with_few_in_flight_arrives_whole_and_in_order(mosquitto, protocol):
    # 700 messages of 1-3 kB with 50 in flight (the rest queued by paho and sent as PUBACKs come
    # in); a manual-ack subscriber acks them in bulk, and a fresh connection of it gets nothing again.
    rng = random.Random(7)
    items = [(f"batch{protocol}/{i % 7}", rng.randbytes(rng.randrange(1000, 3000))) for i in range(700)]
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id=f"batch-sub-{protocol}", manual_ack=True,
                     protocol=protocol)
    pub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id=f"batch-pub-{protocol}", max_inflight=50,
                     protocol=protocol)
    try:
        await sub.connect(5)
        await sub.subscribe(f"batch{protocol}/#", qos=1)
        await pub.connect(5)
        results = await pub.publish_many(items)
        assert results == [None] * len(items)
        assert not pub._pending  # every future resolved and forgotten
        got = await _receive(sub, len(items))
        assert [(m.topic, m.payload) for m in got] == items
        assert {m.qos for m in got} == {1}
        sub.ack_many(got)
        await pub.publish(f"batch{protocol}/last", b"end")  # after the acks on the broker's side
        last = await _receive(sub, 1)
        assert (last[0].topic, last[0].payload) == (f"batch{protocol}/last", b"end")
        sub.ack(last[0])
        # The broker handles a client's packets in order: on this SUBACK it has every PUBACK
        # (a close right after acks may cut them off, and the broker would redeliver anyway).
        await sub.subscribe(f"batch{protocol}/#", qos=1)
        await sub.close()
        sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id=f"batch-sub-{protocol}", manual_ack=True,
                         protocol=protocol)
        await sub.connect(5)
        assert await sub.next_message(timeout=0.5) is None  # every ack reached the broker
    finally:
        await pub.close()
        await sub.close()


async def test_messages_with_properties_qos_0_and_without_subscribers(mosquitto):
    # PUBLISHes with properties and QoS 0 ones interleaved with plain ones arrive in order; a
    # PUBACK saying "no matching subscribers" is a success.
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="mixed-sub", clean_start=True)
    raw = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="mixed-raw", protocol=paho.MQTTv5)
    pub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="mixed-pub")
    try:
        await sub.connect(5)
        await sub.subscribe("mixed/#", qos=1)
        await pub.connect(5)
        assert await pub.publish("nobody/listens/here", b"x", timeout=5) is None
        raw.connect("127.0.0.1", mosquitto.port)
        raw.loop_start()
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("k", "v")
        infos = [raw.publish("mixed/props", b"with properties", qos=1, properties=props),
                 raw.publish("mixed/q0", b"qos 0", qos=0),
                 raw.publish("mixed/plain", b"plain", qos=1)]
        for info in infos:
            await asyncio.to_thread(info.wait_for_publish, 5)
        got = await _receive(sub, 3)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("mixed/props", b"with properties", 1), ("mixed/q0", b"qos 0", 0), ("mixed/plain", b"plain", 1)]
    finally:
        raw.disconnect()
        raw.loop_stop()
        await pub.close()
        await sub.close()


async def test_a_message_from_an_earlier_connection_is_never_acked(tmp_path):
    # The broker redelivers an unacked message on the next connection with the same message id:
    # an ack of the old copy sent then would settle the new one, which was never processed.
    broker = Mosquitto().start(tmp_path)
    pub = MqttClient(host="127.0.0.1", port=broker.port, client_id="gen-pub", clean_start=True)
    sub = MqttClient(host="127.0.0.1", port=broker.port, client_id="gen-sub", manual_ack=True,
                     reconnect_min_s=1, reconnect_max_s=1)
    try:
        await sub.connect(5)
        await sub.subscribe("gen/#", qos=1)
        await pub.connect(5)
        await pub.publish("gen/1", b"one")
        old = (await _receive(sub, 1))[0]
        broker.stop()
        await until(lambda: not sub.connected, 5, "the client to notice")
        broker.start(tmp_path)  # persistent: the session and its unacked message survive
        await until(lambda: sub.reconnects == 1, 15, "the reconnect")
        sub.ack(old)  # from the lost connection: nothing is sent
        again = (await _receive(sub, 1))[0]
        assert (again.payload, again.mid) == (b"one", old.mid) and again is not old
        await sub.subscribe("gen/#", qos=1)  # on its SUBACK the broker has read whatever we sent
        await sub.close()
        sub = MqttClient(host="127.0.0.1", port=broker.port, client_id="gen-sub", manual_ack=True)
        await sub.connect(5)
        third = (await _receive(sub, 1))[0]
        assert third.payload == b"one"  # still unacked on the broker
        sub.ack(third)
        await sub.subscribe("gen/#", qos=1)
        await sub.close()
        sub = MqttClient(host="127.0.0.1", port=broker.port, client_id="gen-sub", manual_ack=True)
        await sub.connect(5)
        assert await sub.next_message(timeout=0.5) is None  # this ack counted
    finally:
        await pub.close()
        await sub.close()
        broker.stop()


@pytest.mark.parametrize("when", ["waiting", "busy"])
async def test_a_socket_lost_under_paho_is_an_outage_like_any_other(mosquitto, caplog, when):
    # A socket closed while paho's thread waits in select is reported by paho (on_disconnect);
    # one closed while it is busy (here: in the on_publish callback) is found by its next
    # select, and paho reconnects without an on_disconnect. Either way the client logs the
    # outage once, counts the reconnect and resubscribes.
    caplog.set_level(logging.INFO, logger="energy_agent.delivery.mqtt")
    c = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id=f"cut-{when}", clean_start=True,
                   reconnect_min_s=1, reconnect_max_s=1)
    try:
        await c.connect(5)
        await c.subscribe("cut/#", qos=1)
        if when == "waiting":
            c._c.socket().close()
        else:
            on_publish = c._c.on_publish

            def cut(client, *args):
                client.on_publish = on_publish
                on_publish(client, *args)
                client.socket().close()

            c._c.on_publish = cut
            await c.publish(f"other/{when}", b"first")
        await until(lambda: c.reconnects == 1 and c.connected, 15, "the reconnect")
        t0 = time.monotonic()
        while True:  # the SUBSCRIBE issued on reconnect may still be on its way
            await c.publish("cut/back", b"again", timeout=5)
            m = await c.next_message(0.2)
            if m is not None:
                break
            assert time.monotonic() - t0 < 5, "not resubscribed"
        assert (m.topic, m.payload) == ("cut/back", b"again")
    finally:
        await c.close()
    records = [r for r in caplog.records if r.name == "energy_agent.delivery.mqtt"]
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1
    assert len([r for r in records if "connected again" in r.getMessage()]) == 1
