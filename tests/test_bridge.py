"""MQTT adapter and bridge against real Mosquitto, InfluxDB 1.6.7 and VictoriaMetrics."""

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from agent import config, record
from agent.bridge import Bridge
from agent.config import EmissionFactor, MeterDevice
from agent.influx import record_to_point
from agent.mqtt import MqttClient
from agent.publish import record_topic
from agent.record import GENESIS, canonical_json

FACTOR = EmissionFactor(value=0.5306, authority="MEE/NBS", document="2023 national average", region="CN",
                        year=2023, basis="location")
METER = MeterDevice(id="pm-9", host="127.0.0.1", profile="schneider-iem3000")


def make_records(n: int, machine: str = "m9", t0: float = 1_790_000_000.0) -> list[dict]:
    recs, prev = [], GENESIS
    for i in range(n):
        kwh = 0.25 + i / 7.0
        energy = SimpleNamespace(kwh=kwh, estimated_kwh=0.0, method="counter",
                                 kwh_by_state=(0.0, 0.0, 0.0, kwh, 0.0, 0.0),
                                 coverage=1.0, gap_count=0, longest_gap_s=0.0, counter_resets=0,
                                 counter_rollovers=0, counter_jumps=0)
        info = SimpleNamespace(key=f"J-{i}", job_id=f"J-{i}", program="O42", product="PCB-7", serial=f"S-{i:04d}",
                               subassembly=None, start=0.0, start_wall=t0 + 600 * i)
        job = SimpleNamespace(machine=machine, info=info, end=300.0, end_wall=t0 + 600 * i + 300, end_reason="key_cleared",
                              parts=1, energy=energy, samples=300, bad_samples=0, median_interval_s=1.0, flags=())
        r = record.build(site="s1", agent="gw1", seq=i + 1, prev_hash=prev, job=job, factor_id="cn-2023",
                         factor=FACTOR, meter=METER, profile="schneider-iem3000", cnc=None, config_hash="0" * 64)
        recs.append(r)
        prev = r["hash"]
    return recs


def bridge_config(tmp_path, mqtt_port, influx: dict) -> config.Loaded:
    data = {
        "site": "s1", "agent_id": "gw1",
        "emission_factors": {"cn-2023": FACTOR.model_dump(mode="json")},
        "meters": [], "cncs": [], "machines": [],
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
        "influx": influx,
    }
    return config.parse(data, tmp_path)


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = await cond() if asyncio.iscoroutinefunction(cond) else cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def publish_all(port: int, recs: list[dict], client_id: str) -> None:
    c = MqttClient(host="127.0.0.1", port=port, client_id=client_id)
    await c.connect(5)
    try:
        await asyncio.gather(*(c.publish(record_topic("energy/v1", r), canonical_json(r)) for r in recs))
    finally:
        await c.close()


async def test_publish_waits_for_puback_with_many_in_flight(mosquitto):
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="t-sub", manual_ack=False, clean_start=True)
    await sub.connect(5)
    await sub.subscribe("load/#", qos=1)
    await asyncio.sleep(0.2)
    pub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="t-pub", max_inflight=200)
    await pub.connect(5)
    n = 500
    await asyncio.gather(*(pub.publish(f"load/{i}", str(i).encode()) for i in range(n)))
    got = set()
    while len(got) < n:
        m = await sub.next_message(timeout=5)
        assert m is not None, f"only {len(got)} of {n} arrived"
        got.add(int(m.payload))
    assert got == set(range(n))
    await pub.close()
    await sub.close()


async def test_connect_to_a_closed_port_is_a_delivery_error():
    from agent.errors import DeliveryError
    from simulators.services import free_port

    c = MqttClient(host="127.0.0.1", port=free_port(), client_id="nobody")
    with pytest.raises(DeliveryError, match="127.0.0.1"):
        await c.connect(timeout=1.0)
    await c.close()


async def test_bridge_to_influxdb_v1_once_and_idempotent(tmp_path, mosquitto, influxdb):
    influxdb.create_database("bridge_v1")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": influxdb.url, "database": "bridge_v1",
                                                       "client_id": "bridge-v1-test"})
    bridge = Bridge(loaded)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await _until(lambda: bridge.client.connected, 10, "bridge connected")
        recs = make_records(12)
        await publish_all(mosquitto.port, recs, "pub-v1")
        await publish_all(mosquitto.port, recs[:5], "pub-v1-replay")  # replayed records
        rows = await _until(lambda: (r := influxdb.query("SELECT * FROM job_energy", "bridge_v1")) and len(r) >= 12
                            and bridge.written >= 17 and r, 15, "points")
    finally:
        stop.set()
        await task
    rows = influxdb.query("SELECT * FROM job_energy", "bridge_v1")
    assert len(rows) == 12  # 17 writes, 12 records: replays overwrote their own points
    by_id = {r["record_id"]: r for r in rows}
    for rec in recs:
        row = by_id[rec["record_id"]]
        assert row["kwh"] == pytest.approx(rec["energy"]["kwh"], abs=1e-12)
        assert row["kgco2e"] == pytest.approx(rec["emissions"]["kgco2e"], abs=1e-12)
        assert (row["machine"], row["serial"], row["program"], row["job_id"]) == (
            "m9", rec["job"]["serial"], "O42", rec["job"]["job_id"])
        assert row["seq"] == rec["seq"] and row["hash"] == rec["hash"]


async def test_bridge_to_victoriametrics_v2(tmp_path, mosquitto, victoria):
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v2", "url": victoria.url, "org": "o", "bucket": "b",
                                                       "client_id": "bridge-vm-test"})
    bridge = Bridge(loaded)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    recs = make_records(6, machine="vm-m1")
    try:
        await _until(lambda: bridge.client.connected, 10, "bridge connected")
        await publish_all(mosquitto.port, recs, "pub-vm")
        await _until(lambda: bridge.written >= 6, 15, "6 writes")
    finally:
        stop.set()
        await task
    victoria.force_flush()
    series = victoria.export('{__name__="job_energy_kwh",machine="vm-m1"}')
    values = sorted((ts, v) for s in series for ts, v in zip(s["timestamps"], s["values"]))
    assert len(values) == 6
    expected = sorted((int(record_to_point(r)._time // 1_000_000), r["energy"]["kwh"]) for r in recs)
    assert [ts for ts, _ in values] == [ts for ts, _ in expected]
    assert [v for _, v in values] == pytest.approx([v for _, v in expected], abs=1e-9)


MALFORMED = [
    b"", b"not json", b"{", b"[]", b"null", b"42", b'"a string"', b"\xff\xfe\x00garbage",
    json.dumps({"schema": "energy-agent.job-record/999"}).encode(),
    json.dumps({"schema": "energy-agent.job-record/1"}).encode(),
]


def _mutations(rec: dict) -> list[bytes]:
    out = []
    for path, value in [("energy.kwh", "1.5"), ("energy.kwh", None), ("start", "yesterday"), ("seq", 1.5),
                        ("machine", 7), ("quality.gap_count", "0"), ("energy.by_state", []), ("hash", None),
                        ("emissions.kgco2e", True), ("job", "J-1"), ("end", 12345)]:
        r = json.loads(json.dumps(rec))
        cur = r
        *parents, last = path.split(".")
        for p in parents:
            cur = cur[p]
        cur[last] = value
        out.append(json.dumps(r).encode())
    r = json.loads(json.dumps(rec))
    del r["energy"]
    out.append(json.dumps(r).encode())
    return out


async def test_bridge_dead_letters_malformed_payloads_and_keeps_working(tmp_path, mosquitto, influxdb):
    influxdb.create_database("bridge_fuzz")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": influxdb.url, "database": "bridge_fuzz",
                                                       "client_id": "bridge-fuzz-test"})
    bridge = Bridge(loaded)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    good = make_records(3, machine="fz")
    bad = MALFORMED + _mutations(good[0]) + [b"x" * 300_000]
    wrong_topic = canonical_json(good[1])
    try:
        await _until(lambda: bridge.client.connected, 10, "bridge connected")
        c = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="fuzzer")
        await c.connect(5)
        for payload in bad:
            await c.publish("energy/v1/s1/gw1/fz/record", payload)
        await c.publish("energy/v1/s1/gw1/other-machine/record", wrong_topic)
        await c.close()
        await publish_all(mosquitto.port, good, "pub-after-fuzz")
        await _until(lambda: bridge.written >= 3 and sum(bridge.dead.values()) >= len(bad) + 1, 15, "all handled")
    finally:
        stop.set()
        await task  # raises if the bridge crashed on any payload
    rows = influxdb.query("SELECT * FROM job_energy", "bridge_fuzz")
    assert sorted(r["record_id"] for r in rows) == sorted(r["record_id"] for r in good)
    lines = (tmp_path / "dead-letter.jsonl").read_text().splitlines()
    assert len(lines) == len(bad) + 1
    reasons = [json.loads(line)["reason"] for line in lines]
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("unknown schema" in r for r in reasons)
    assert any("record field 'energy.kwh' must be int/float, not str" in r for r in reasons)
    assert any(r.startswith("wrong topic") for r in reasons)
