"""paho's network thread in batches (energy_agent.delivery.mqtt._Client) against a real Mosquitto: joined writes,
read-ahead, the short paths for plain PUBACKs and PUBLISHes, bulk acks, and the check that the
installed paho is the one those rely on."""

import asyncio
import collections
import random

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from energy_agent.delivery import mqtt
from energy_agent.delivery.mqtt import MqttClient


def test_the_installed_paho_is_the_one_the_batching_relies_on():
    # Fails when paho-mqtt is upgraded: review energy_agent.delivery.mqtt._Client against the new source, then
    # update PAHO_INTERNALS (MqttClient refuses to start until then).
    assert mqtt.paho_differences() == []
    mqtt.check_paho()


def test_a_changed_paho_is_named():
    assert mqtt.paho_differences(version="2.3.0") == ["version 2.3.0 (tested: 2.2.0)"]
    changed = type("Client", (paho.Client,), {"_packet_write": lambda self: paho.MQTTErrorCode.MQTT_ERR_SUCCESS})
    assert mqtt.paho_differences(changed, version=mqtt.PAHO_TESTED) == ["Client._packet_write changed"]
    gone = type("Client", (paho.Client,), {"_update_inflight": None})
    assert mqtt.paho_differences(gone, version=mqtt.PAHO_TESTED) == [
        "Client._update_inflight missing or without source"]


def _pkt(command: int, data: bytes, qos: int = 1, pos: int = 0) -> dict:
    return {"command": command, "mid": 1, "qos": qos, "pos": pos, "to_process": len(data) - pos, "packet": data,
            "info": None}


def test_joining_keeps_every_byte_in_order_and_stops_where_paho_has_work_after_a_write():
    big = b"p" * (mqtt.WRITE_MAX // 2 + 1)  # two of them fill a join
    q = collections.deque([_pkt(paho.PUBLISH | 2, b"a" + big), _pkt(paho.PUBACK, b"b"), _pkt(paho.PUBLISH | 2, b"c" + big),
                           _pkt(paho.PUBLISH | 2, b"d"), _pkt(paho.PUBLISH, b"q0", qos=0),
                           _pkt(paho.PUBACK, b"e"), _pkt(paho.DISCONNECT, b"x", qos=0)])
    mqtt._join_queued(q)
    # a QoS 0 PUBLISH (its write completes the publish) and what follows stay as they were
    assert [p["packet"] for p in q][-3:] == [b"q0", b"e", b"x"]
    joined = list(q)[:-3]
    assert b"".join(p["packet"] for p in joined) == b"a" + big + b"b" + b"c" + big + b"d"
    assert len(joined) == 2 and all(p["to_process"] == len(p["packet"]) and p["pos"] == 0 for p in joined)
    assert all(len(p["packet"]) <= mqtt.WRITE_MAX + len(big) + 1 for p in joined)

    partly = collections.deque([_pkt(paho.PUBLISH | 2, b"abc", pos=1), _pkt(paho.PUBACK, b"b")])
    mqtt._join_queued(partly)  # a packet partly written is continued by paho as it is
    assert [p["packet"] for p in partly] == [b"abc", b"b"] and partly[0]["pos"] == 1


async def _receive(sub: MqttClient, n: int) -> list:
    got = []
    while len(got) < n:
        m = await sub.next_message(timeout=10)
        assert m is not None, f"{sub.client_id} got {len(got)} of {n}"
        got.append(m)
    return got


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_large_batch_with_few_in_flight_arrives_whole_and_in_order(mosquitto, protocol):
    # 700 messages of 1-3 kB (more than WRITE_MAX, so several joined writes) with 50 in flight
    # (the rest queued by paho and sent as PUBACKs come in); a manual-ack subscriber acks them in
    # bulk, and a fresh connection of it gets nothing again.
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
        assert not pub._c._out_messages and pub._c._inflight_messages == 0 and not pub._pending
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


async def test_messages_paho_decodes_itself_still_arrive(mosquitto):
    # PUBLISHes with properties and QoS 0 ones take paho's own path, interleaved with plain ones;
    # a PUBACK saying "no matching subscribers" is a success.
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
