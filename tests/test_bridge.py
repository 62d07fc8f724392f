"""MQTT adapter and bridge against real Mosquitto, InfluxDB 1.6.7 and VictoriaMetrics.

Records are built here from docs/CONTRACTS.md. Waits poll a condition with a deadline.
"""

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from influxdb_client import Point, WritePrecision

from energy_agent.app import config
from energy_agent.bridge.bridge import Bridge
from energy_agent.bridge.lineproto import record_line, time_ns
from energy_agent.core.errors import ConfigError, DeliveryError, RecordError
from energy_agent.core.record import parse_record
from energy_agent.core.states import STATES
from energy_agent.delivery.mqtt import MqttClient
from energy_agent.simulators.services import (
    InfluxDB1,
    Mosquitto,
    VictoriaMetrics,
    free_port,
)

SITE, AGENT = "s1", "gw1"
FACTOR = {"value": 0.5306, "authority": "MEE/NBS", "document": "2023 national average", "region": "CN",
          "year": 2023, "basis": "location"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_record(i: int, machine: str = "m9", t0: float = 1_790_000_000.0, prev: str = "0" * 64, **job) -> dict:
    """Record ``i`` of a machine, shaped as docs/CONTRACTS.md "Emission record" says."""
    start = t0 + 600 * i + 0.123456
    kwh = round(0.25 + i / 7.0, 6)
    by_state = dict.fromkeys(STATES, 0.0) | {"processing": round(kwh - 0.01, 6), "setup": 0.01}
    key = job.pop("key", f"J-{i}")
    rec = {
        "schema": "energy-agent.job-record/2",
        "record_id": hashlib.sha256(f"{SITE}/{AGENT}/{machine}/{key}/{iso(start)}".encode()).hexdigest()[:32],
        "site": SITE, "agent": AGENT, "machine": machine, "seq": i + 1,
        "job": {"key": key, "job_id": key, "program": "O42", "product": "PCB-7", "serials": [f"S-{i:04d}"],
                "subassembly": None, "order": None, "assignment": "cnc", "parts": 1,
                "end_reason": "parts_counter"} | job,
        "start": iso(start), "end": iso(start + 330), "duration_s": 330.0,
        "boundaries": {"start": {"basis": "observed", "reason": None}, "end": {"basis": "observed", "reason": None}},
        "energy": {"kwh": kwh, "estimated_kwh": 0.0, "method": "counter", "by_state": by_state,
                   "unknown_reason": None},
        "emissions": {"kgco2e": round(kwh * FACTOR["value"], 6),
                      "factor": {"id": "cn-2023", **FACTOR, "unit": "kgCO2e/kWh", "method": "",
                                 "valid_from": None, "valid_to": None}},
        "quality": {"coverage": 0.98, "gap_count": 1, "longest_gap_s": 2.5, "counter_resets": 0,
                    "counter_rollovers": 0, "counter_jumps": 0, "estimated_share": 0.0, "samples": 331,
                    "bad_samples": 0, "median_interval_s": 1.0, "flags": []},
        "meter": {"id": "pm-9", "profile": "schneider-iem3000", "accuracy": None, "calibration": None,
                  "boundary": None},
        "cnc": None,
        "allocation": "direct",
        "provenance": {"agent_version": "0.1.0", "config_hash": "0" * 64, "kernel": "job_energy/1"},
        "prev_hash": prev,
    }
    rec["hash"] = hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return rec


def make_records(n: int, machine: str = "m9", first: int = 0) -> list[dict]:
    recs, prev = [], "0" * 64
    for i in range(first, first + n):
        recs.append(make_record(i, machine, prev=prev))
        prev = recs[-1]["hash"]
    return recs


def topic(rec: dict) -> str:
    return f"energy/v1/{rec['site']}/{rec['agent']}/{rec['machine']}/record"


def payload(rec: dict) -> bytes:
    return json.dumps(rec).encode()


def bridge_config(tmp_path, mqtt_port: int, influx: dict) -> config.Loaded:
    data = {
        "site": SITE, "agent_id": AGENT,
        "emission_factors": {"cn-2023": FACTOR}, "meters": [], "cncs": [], "machines": [],
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
        "influx": influx,
    }
    return config.parse(data, tmp_path)


async def until(cond, timeout: float, what: str):
    """Poll ``cond`` (sync or async) until truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = await cond() if asyncio.iscoroutinefunction(cond) else cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def publish_all(port: int, recs: list[dict], client_id: str) -> None:
    c = MqttClient(host="127.0.0.1", port=port, client_id=client_id, clean_start=True)
    await c.connect(5)
    try:
        await asyncio.gather(*(c.publish(topic(r), payload(r)) for r in recs))
    finally:
        await c.close()


class Running:
    """A Bridge running as a task; ``async with`` stops it and re-raises what it raised."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Bridge:
        self.task = asyncio.create_task(self.bridge.run(self.stop))
        await until(lambda: self.bridge.ready.is_set() or self.task.done(), 10, "the bridge to subscribe")
        if self.task.done():
            self.task.result()
        return self.bridge

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


def rows_by_id(influxdb, db: str) -> dict:
    try:
        rows = influxdb.query("SELECT * FROM job_energy", db)
    except Exception:  # noqa: BLE001 - while the database is down
        return {}
    return {r["record_id"]: r for r in rows}


def assert_row_matches(row: dict, rec: dict) -> None:
    start_ns = int(round(datetime.strptime(rec["start"], "%Y-%m-%dT%H:%M:%S.%fZ")
                         .replace(tzinfo=timezone.utc).timestamp() * 1e6)) * 1000
    assert row["time"] == start_ns
    assert row["kwh"] == pytest.approx(rec["energy"]["kwh"], abs=1e-12)
    for s in STATES:
        assert row[f"kwh_{s}"] == pytest.approx(rec["energy"]["by_state"][s], abs=1e-12)
    assert row["kgco2e"] == pytest.approx(rec["emissions"]["kgco2e"], abs=1e-12)
    assert row["factor"] == rec["emissions"]["factor"]["value"] and row["factor_id"] == "cn-2023"
    assert (row["site"], row["agent"], row["machine"], row["program"], row["product"], row["serial"]) == (
        SITE, AGENT, rec["machine"], "O42", "PCB-7", rec["job"]["serials"][0])
    assert row.get("subassembly") is None  # null in the record: no tag
    assert (row["job_id"], row["seq"], row["hash"], row["method"]) == (
        rec["job"]["job_id"], rec["seq"], rec["hash"], "counter")
    assert row["duration_s"] == 330.0 and row["end_ns"] == start_ns + 330 * 10**9
    assert (row["coverage"], row["gap_count"], row["longest_gap_s"], row["counter_resets"]) == (0.98, 1, 2.5, 0)
    assert row["estimated_kwh"] == 0.0


# ---------------------------------------------------------------------- the point, no services


def line_of(rec: dict, measurement: str = "job_energy") -> bytes:
    """What the bridge writes for a record as it arrives (JSON): parse, then encode."""
    return record_line(parse_record(rec), measurement)


def point_of(rec: dict, measurement: str = "job_energy") -> bytes:
    """The same point built with influxdb-client's Point (a line-protocol writer we did not
    write), straight from docs/CONTRACTS.md: the oracle for ``record_line``."""
    def ns(stamp: str) -> int:
        dt = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        return (dt - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1) * 1000

    start, end = ns(rec["start"]), ns(rec["end"])
    p = Point(measurement).time(start, WritePrecision.NS)
    for tag in ("site", "agent", "machine"):
        p.tag(tag, rec[tag])
    for tag in ("program", "product", "subassembly"):
        if rec["job"][tag]:
            p.tag(tag, rec["job"][tag])
    if len(rec["job"]["serials"]) == 1 and rec["job"]["serials"][0]:
        p.tag("serial", rec["job"]["serials"][0])
    e, q = rec["energy"], rec["quality"]
    p.field("record_id", rec["record_id"]).field("job_id", rec["job"]["job_id"] or rec["job"]["key"])
    p.field("seq", int(rec["seq"])).field("kwh", float(e["kwh"]))
    for s in STATES:
        p.field(f"kwh_{s}", float(e["by_state"][s]))
    p.field("estimated_kwh", float(e["estimated_kwh"])).field("kgco2e", float(rec["emissions"]["kgco2e"]))
    p.field("factor", float(rec["emissions"]["factor"]["value"])).field("factor_id", rec["emissions"]["factor"]["id"])
    p.field("duration_s", float(rec["duration_s"])).field("end_ns", end).field("coverage", float(q["coverage"]))
    p.field("gap_count", int(q["gap_count"])).field("longest_gap_s", float(q["longest_gap_s"]))
    p.field("counter_resets", int(q["counter_resets"])).field("method", e["method"]).field("hash", rec["hash"])
    p.field("flags", ",".join(q["flags"])).field("serials", ",".join(rec["job"]["serials"]))
    p.field("start_basis", rec["boundaries"]["start"]["basis"]).field("end_basis", rec["boundaries"]["end"]["basis"])
    if rec["job"]["parts"] is not None:
        p.field("parts", int(rec["job"]["parts"]))
    return p.to_line_protocol().encode("utf-8")


def test_point_is_the_contract():
    rec = make_record(3)
    rec["energy"]["kwh"] = 1  # an integral JSON number is still written as a float
    head, fields, ts = line_of(rec).decode().split(" ")
    assert head == "job_energy,agent=gw1,machine=m9,product=PCB-7,program=O42,serial=S-0003,site=s1"
    assert int(ts) == 1_790_001_800_123_456_000
    kv = dict(f.split("=", 1) for f in fields.split(","))
    assert set(kv) == {"record_id", "job_id", "seq", "kwh", *(f"kwh_{s}" for s in STATES), "estimated_kwh",
                       "kgco2e", "factor", "factor_id", "duration_s", "end_ns", "coverage", "gap_count",
                       "longest_gap_s", "counter_resets", "method", "hash", "flags", "serials", "parts",
                       "start_basis", "end_basis"}
    assert (kv["seq"], kv["gap_count"], kv["counter_resets"]) == ("4i", "1i", "0i")
    assert kv["end_ns"] == f"{1_790_001_800_123_456_000 + 330 * 10**9}i"
    assert kv["kwh"] == "1" and kv["method"] == '"counter"' and kv["record_id"] == f'"{rec["record_id"]}"'
    assert line_of(rec, "other").startswith(b"other,")
    rec["job"].update(program=None, product="", serials=[], job_id=None)
    head = line_of(rec).decode().split(" ")[0]
    assert head == "job_energy,agent=gw1,machine=m9,site=s1"
    assert b'job_id="J-3"' in line_of(rec)  # no job id: the job key


@pytest.mark.parametrize("path,value,message", [
    ("schema", "energy-agent.job-record/9", "record field schema: unknown schema 'energy-agent.job-record/9'"),
    ("energy.kwh", "1.5", "record field energy.kwh: Input should be a valid number"),
    ("energy.by_state.setup", None, "record field energy.by_state.setup: Input should be a valid number"),
    ("seq", 1.0, "record field seq: Input should be a valid integer"),
    ("quality.gap_count", True, "record field quality.gap_count: Input should be a valid integer"),
    ("start", "2999-01-01T00:00:00.000000Z", "record field start: '2999-01-01T00:00:00.000000Z' is outside "
                                             "what InfluxDB can store"),
    ("end", "yesterday", "record field end: String should match pattern"),
    ("machine", "", "record field machine: String should match pattern"),
    ("job.serials", 7, "record field job.serials: Input should be a valid array"),
    ("hash", None, "record field hash: Input should be a valid string"),
    ("seq", 2**64, "record field seq"),
])
def test_invalid_records_name_the_field(path, value, message):
    rec = make_record(0)
    *parents, last = path.split(".")
    cur = rec
    for p in parents:
        cur = cur[p]
    cur[last] = value
    with pytest.raises(RecordError, match=re.escape(message)):
        line_of(rec)
    del cur[last]
    with pytest.raises(RecordError, match=re.escape(f"record field {path}: Field required")):
        line_of(rec)


AWKWARD = ["O 42", "a,b", "k=v", 'say "hi"', "back\\slash", "ends\\", "tab\there", "new\nline", "cr\rx",
           "é-ü", "零件 7", "🔧", "#hash", "=", ",", " ", "\\", '"', "x" * 4096]
"""Strings that line protocol escapes (tags: comma, equals, space, \\n \\t \\r; string fields:
quote, backslash), unicode, and the longest string a record may carry."""
IDS = ["m9", "M_1", "line-2.cell-3", "a" * 64]
"""Site, agent and machine ids: the config's id rules (they are part of topics and record ids)."""

FLOATS = [0.0, -0.0, 1, 7, -3, 0.1 + 0.2, 1e-300, 1.5e-7, 1e16, 1.7976931348623157e308, 123456.789, 2**62, -(2**53)]
"""JSON numbers as floats or integers: Python's shortest repr, exponents, '.0' trimmed, big ints."""


def _variants(rng) -> list[dict]:
    """Valid records that stress escaping, number formatting and timestamps (seeded)."""
    out = []
    for i in range(400):
        rec = make_record(i, machine=rng.choice(IDS))
        job = rec["job"]
        for tag in ("program", "product", "subassembly"):
            job[tag] = rng.choice([None, "", rng.choice(AWKWARD), f"{tag}-{i}"])
        job["serials"] = rng.choice([[], [rng.choice(AWKWARD)], [f"S-{i}"], [f"S-{i}", "S-x"]])
        rec["site"], rec["agent"] = rng.choice([SITE, *IDS]), rng.choice([AGENT, *IDS])
        job["job_id"] = rng.choice([None, "", job["key"], rng.choice(AWKWARD)])
        job["key"] = rng.choice([job["key"], rng.choice(AWKWARD)])
        for s in STATES:
            rec["energy"]["by_state"][s] = rng.choice(FLOATS + [rng.uniform(0, 50)])
        for path in ("energy.kwh", "energy.estimated_kwh", "emissions.kgco2e", "emissions.factor.value",
                     "duration_s", "quality.coverage", "quality.longest_gap_s"):
            *parents, last = path.split(".")
            cur = rec
            for p in parents:
                cur = cur[p]
            cur[last] = rng.choice(FLOATS + [rng.uniform(-1e6, 1e6)])
        rec["seq"] = rng.choice([0, 1, i, 2**53 - 1])
        rec["quality"]["gap_count"] = rng.choice([0, 3, 2**31])
        rec["emissions"]["factor"]["id"] = rng.choice(["cn-2023", *AWKWARD])
        rec["energy"]["method"] = rng.choice(["counter", "power", "mixed"])
        rec["start"] = rng.choice([rec["start"], "1970-01-01T00:00:00.000000Z", "1969-12-31T23:59:59.999999Z",
                                   "2024-02-29T12:00:00.500000Z", "1677-09-22T00:00:00.000000Z",
                                   "2262-04-10T23:59:59.999999Z"])
        out.append(json.loads(json.dumps(rec)))  # as the bridge sees it: parsed from JSON
    return out


def test_line_is_exactly_the_point():
    """record_line writes the bytes influxdb-client's Point writes, for records that exercise
    every escaping and number-formatting rule."""
    import random

    rng = random.Random(1790)
    recs = _variants(rng)
    for measurement in ("job_energy", "energy use", "a,b=c"):
        for rec in recs:
            assert line_of(rec, measurement) == point_of(rec, measurement), rec


def test_malformed_records_raise_only_record_errors():
    """Thousands of mutations of a good record: each is encoded or refused with a RecordError
    (never another exception, which would stop the bridge instead of dead-lettering)."""
    import random

    rng = random.Random(14067)
    good = make_record(5)
    cases = [json.loads(p) for p in _mutations(good)]
    cases += [None, [], "x", 42, {}, {"schema": "energy-agent.job-record/1"}]
    odd = [None, True, False, 0, -1, 1.5, 2**63, 2**64, 10**400, float("nan"), float("inf"), "", "1", "\ud800",
           "x" * 4097, [], {}, [1], {"a": 1}, "2026-01-01T00:00:00.000000Z", "3000-01-01T00:00:00.000000Z",
           "2026-02-30T00:00:00.000000Z", "2026-01-01T24:00:00.000000Z", "2026-01-01T00:00:60.000000Z",
           "２０２６-01-01T00:00:00.000000Z"]
    paths = ["schema", "record_id", "site", "agent", "machine", "seq", "start", "end", "duration_s", "hash",
             "job", "job.key", "job.job_id", "job.program", "job.product", "job.serials", "job.subassembly",
             "energy", "energy.kwh", "energy.estimated_kwh", "energy.method", "energy.by_state",
             *(f"energy.by_state.{s}" for s in STATES), "emissions", "emissions.kgco2e", "emissions.factor",
             "emissions.factor.value", "emissions.factor.id", "quality", "quality.coverage", "quality.gap_count",
             "quality.longest_gap_s", "quality.counter_resets"]
    for _ in range(3000):
        rec = json.loads(json.dumps(good))
        for path in rng.sample(paths, rng.choice([1, 1, 2])):
            *parents, last = path.split(".")
            cur = rec
            for p in parents:
                cur = cur.get(p) if isinstance(cur, dict) else None
            if isinstance(cur, dict):
                if rng.random() < 0.1:
                    cur.pop(last, None)
                else:
                    cur[last] = rng.choice(odd)
        cases.append(rec)
    errors = 0
    for rec in cases:
        try:
            payload = json.dumps(rec).encode("utf-8", "surrogatepass")
        except ValueError:
            continue
        try:
            record_line(parse_record(payload))
        except RecordError:
            errors += 1
    assert errors > len(cases) // 2  # the mutations mostly break the record


def test_bridge_needs_mqtt_and_influx(tmp_path):
    loaded = bridge_config(tmp_path, 1883, {"api": "v1", "url": "http://127.0.0.1:1", "database": "x"})
    for missing in ("mqtt", "influx"):
        cfg = loaded.config.model_copy(update={missing: None})
        with pytest.raises(ConfigError, match=f"^{missing}: the bridge needs"):
            config.Loaded(cfg, tmp_path).bridge_settings()


# ---------------------------------------------------------------------- MQTT adapter


async def test_many_concurrent_publishes_each_return_on_their_puback(mosquitto):
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="t-sub", clean_start=True)
    await sub.connect(5)
    await sub.subscribe("load/#", qos=1)  # returns on SUBACK
    pub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="t-pub", max_inflight=100)
    await pub.connect(5)
    n = 500
    t0 = time.monotonic()
    await asyncio.gather(*(pub.publish(f"load/{i}", str(i).encode()) for i in range(n)))
    elapsed = time.monotonic() - t0
    got = set()
    while len(got) < n:
        m = await sub.next_message(timeout=5)
        assert m is not None, f"only {len(got)} of {n} arrived"
        got.add(int(m.payload))
    assert got == set(range(n))
    assert elapsed < 10, f"{n} publishes took {elapsed:.1f} s"
    assert not pub._pending  # every future resolved and forgotten
    await pub.close()
    await sub.close()


async def test_publish_waits_for_the_puback(tmp_path):
    """With the broker frozen (SIGSTOP), publish does not return; it does once the broker answers."""
    broker = Mosquitto().start(tmp_path)
    c = MqttClient(host="127.0.0.1", port=broker.port, client_id="waiter", keepalive=60)
    try:
        await c.connect(5)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DeliveryError, match="no acknowledgement within 0.3 s"):
                await c.publish("t/a", b"1", timeout=0.3)
            pending = asyncio.create_task(c.publish("t/b", b"2", timeout=10))
            await asyncio.sleep(0.3)
            assert not pending.done()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await asyncio.wait_for(pending, 5)
        await c.publish("t/c", b"3", qos=0)  # QoS 0: nothing to wait for
    finally:
        await c.close()
        broker.stop()


async def test_outage_fails_fast_logs_once_and_reconnects_with_subscriptions(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.delivery.mqtt")
    broker = Mosquitto().start(tmp_path)
    c = MqttClient(host="127.0.0.1", port=broker.port, client_id="outage", reconnect_min_s=1, reconnect_max_s=1)
    try:
        await c.connect(5)
        await c.subscribe("back/#")
        broker.stop()
        await until(lambda: not c.connected, 5, "the client to notice")
        t0 = time.monotonic()
        for _ in range(20):
            with pytest.raises(DeliveryError, match="not connected"):
                await c.publish("back/x", b"lost?")
        assert time.monotonic() - t0 < 0.5
        broker.start(tmp_path)
        await c.wait_connected(10)
        assert c.session_present and c.reconnects == 1
        await c.publish("back/y", b"after")
        m = await c.next_message(5)  # resubscribed: our own message comes back
        assert m is not None and (m.topic, m.payload) == ("back/y", b"after")
    finally:
        await c.close()
        broker.stop()
    records = [r for r in caplog.records if r.name == "energy_agent.delivery.mqtt"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    again = [r for r in records if "connected again" in r.getMessage()]
    assert len(warnings) == 1 and "connection lost" in warnings[0].getMessage()
    assert len(again) == 1 and "after" in again[0].getMessage()


async def test_connect_to_a_closed_port_says_refused():
    c = MqttClient(host="127.0.0.1", port=free_port(), client_id="nobody")
    with pytest.raises(DeliveryError, match="127.0.0.1.*connection refused"):
        await c.connect(timeout=0.5)
    await c.close()


async def test_two_clients_with_one_client_id_are_named_once(tmp_path, caplog):
    """The broker drops the older of two clients sharing a client id, then the other: say so, once."""
    caplog.set_level(logging.DEBUG, logger="energy_agent.delivery.mqtt")
    broker = Mosquitto().start(tmp_path)
    a = MqttClient(host="127.0.0.1", port=broker.port, client_id="twin", reconnect_min_s=1, reconnect_max_s=1)
    b = MqttClient(host="127.0.0.1", port=broker.port, client_id="twin", reconnect_min_s=1, reconnect_max_s=1)
    try:
        await a.connect(5)
        await b.connect(5)

        def named():
            return [r for r in caplog.records if r.levelno == logging.ERROR and "'twin'" in r.getMessage()]

        await until(named, 15, "the client id conflict to be reported")
    finally:
        await a.close()
        await b.close()
        broker.stop()
    assert len(named()) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 2 * 3


async def test_events_after_a_burst_still_wake_the_loop(mosquitto):
    """During a burst the loop collects paho's events on a timer; once it is over, a single
    PUBACK or message must wake the loop again on its own (it would hang otherwise)."""
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="burst-sub", clean_start=True)
    pub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="burst-pub", max_inflight=200)
    await sub.connect(5)
    await sub.subscribe("burst/#", qos=1)
    await pub.connect(5)
    try:
        for round_ in range(3):
            results = await pub.publish_many([(f"burst/{round_}/{i}", b"x") for i in range(300)])
            assert not any(results)
            got = [await sub.next_message(5) for _ in range(300)]
            assert all(m is not None for m in got)
            await asyncio.sleep(0.05)  # quiet: the collection timer finds nothing and stops
            await pub.publish(f"burst/{round_}/single", b"one", timeout=5)  # its PUBACK alone wakes the loop
            m = await sub.next_message(5)
            assert m is not None and m.topic == f"burst/{round_}/single"
    finally:
        await pub.close()
        await sub.close()


async def test_manual_ack_holds_messages_until_acked(mosquitto):
    pub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="ma-pub", clean_start=True)
    await pub.connect(5)
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="ma-sub", manual_ack=True)
    await sub.connect(5)
    await sub.subscribe("ma/#")
    await pub.publish("ma/1", b"one")
    await pub.publish("ma/2", b"two")
    first = [await sub.next_message(5), await sub.next_message(5)]
    sub.ack(first[0])  # only the first
    await asyncio.sleep(0.1)
    await sub.close()
    sub = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="ma-sub", manual_ack=True)
    await sub.connect(5)
    again = await sub.next_message(5)
    assert again is not None and again.payload == b"two"  # redelivered: never acked
    sub.ack(again)
    assert await sub.next_message(0.3) is None
    await sub.close()
    await pub.close()


# ---------------------------------------------------------------------- bridge


async def test_bridge_to_influxdb_v1_once_and_idempotent(tmp_path, mosquitto, influxdb):
    influxdb.create_database("bridge_v1")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": influxdb.url, "database": "bridge_v1",
                                                       "client_id": "bridge-v1-test"})
    recs = make_records(12)
    async with Running(Bridge(loaded.bridge_settings(), dead_letter_path=tmp_path / "dl.jsonl")) as bridge:
        await publish_all(mosquitto.port, recs, "pub-v1")
        await publish_all(mosquitto.port, recs[:5], "pub-v1-replay")  # replayed records
        await until(lambda: bridge.written >= 17, 15, "17 writes")
    rows = influxdb.query("SELECT * FROM job_energy", "bridge_v1")
    assert len(rows) == 12  # 17 writes, 12 records: the replays overwrote their own points
    by_id = {r["record_id"]: r for r in rows}
    for rec in recs:
        assert_row_matches(by_id[rec["record_id"]], rec)
    assert not bridge.dead and not (tmp_path / "dl.jsonl").read_text()


async def test_bridge_in_small_batches_lands_awkward_strings_and_acks_everything(tmp_path, mosquitto, influxdb):
    """Many small batches (one written while the next is decoded): every point lands with its
    tags and strings as the record has them, and every message is acknowledged, so a second
    run of the same bridge session receives nothing again."""
    influxdb.create_database("bridge_batches")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": influxdb.url,
                                                       "database": "bridge_batches", "client_id": "bridge-batches"})
    recs = make_records(150, machine="bt")
    # Point's tag escaping, kept as it is: a tag ending in a backslash gets a space appended,
    # and InfluxDB 1.x reads \t \n \r in a tag as a backslash and a letter. The others round-trip.
    tags = [s[:200] for s in AWKWARD if not s.endswith("\\") and not any(c in s for c in "\t\n\r")]
    strings = [s[:200] for s in AWKWARD]
    for i, rec in enumerate(recs):
        rec["job"]["program"] = tags[i % len(tags)]
        rec["emissions"]["factor"]["id"] = strings[(i + 3) % len(strings)]

    def make():
        return Bridge(loaded.bridge_settings(), dead_letter_path=tmp_path / "dl.jsonl", batch_max=7, batch_window_s=0.01)

    async with Running(make()) as bridge:
        await publish_all(mosquitto.port, recs, "pub-batches")
        await until(lambda: bridge.written >= len(recs), 20, f"{len(recs)} writes")
    assert bridge.written == len(recs) and not bridge.dead
    rows = rows_by_id(influxdb, "bridge_batches")
    assert len(rows) == len(recs)
    for rec in recs:
        row = rows[rec["record_id"]]
        assert (row["program"], row["factor_id"], row["serial"]) == (
            rec["job"]["program"], rec["emissions"]["factor"]["id"], rec["job"]["serials"][0])
        assert row["kwh"] == pytest.approx(rec["energy"]["kwh"], abs=1e-12) and row["seq"] == rec["seq"]
    # Same session again: the broker resends what was never acknowledged first, then a new record.
    sentinel = make_record(150, machine="bt")
    async with Running(make()) as again:
        await publish_all(mosquitto.port, [sentinel], "pub-batches-2")
        await until(lambda: sentinel["record_id"] in rows_by_id(influxdb, "bridge_batches"), 20, "the new record")
        await until(lambda: again.written >= 1, 5, "its write to be counted")
    assert again.written == 1 and not again.dead


@pytest.fixture(scope="module")
def own_victoria(tmp_path_factory):
    """A VictoriaMetrics of this module's own: it has no databases to keep tests apart."""
    with VictoriaMetrics().start(tmp_path_factory.mktemp("vm-bridge")) as vm:
        yield vm


async def test_bridge_to_victoriametrics_v2(tmp_path, mosquitto, own_victoria, monkeypatch):
    victoria = own_victoria
    monkeypatch.setenv("VM_TEST_TOKEN", "secret")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v2", "url": victoria.url, "org": "o", "bucket": "b",
                                                       "token_env": "VM_TEST_TOKEN", "client_id": "bridge-vm-test"})
    recs = make_records(6, machine="vm-m1")
    async with Running(Bridge(loaded.bridge_settings(), dead_letter_path=tmp_path / "dl.jsonl")) as bridge:
        await publish_all(mosquitto.port, recs, "pub-vm")
        await publish_all(mosquitto.port, recs[:2], "pub-vm-replay")
        await until(lambda: bridge.written >= 8, 15, "8 writes")
    victoria.force_flush()
    series = {s["metric"]["__name__"]: s for s in victoria.export('{machine="vm-m1"}')}
    # VictoriaMetrics flattens <measurement>_<field>; tags become labels (the v2 bucket does not:
    # no db label); string fields become series whose values are all 0.
    assert set(series) == {f"job_energy_{f}" for f in (
        "record_id", "job_id", "seq", "kwh", *(f"kwh_{s}" for s in STATES), "estimated_kwh", "kgco2e", "factor",
        "factor_id", "duration_s", "end_ns", "coverage", "gap_count", "longest_gap_s", "counter_resets", "method",
        "hash", "flags", "serials", "parts", "start_basis", "end_basis")}
    kwh = series["job_energy_kwh"]
    assert {k: v for k, v in kwh["metric"].items() if k != "serial"} == {
        "__name__": "job_energy_kwh", "site": SITE, "agent": AGENT, "machine": "vm-m1",
        "program": "O42", "product": "PCB-7"}
    samples = sorted((ts, v) for s in victoria.export('{__name__="job_energy_kwh",machine="vm-m1"}')
                     for ts, v in zip(s["timestamps"], s["values"]))
    expected = sorted((time_ns(r["start"], "start") // 1_000_000, r["energy"]["kwh"]) for r in recs)
    assert [ts for ts, _ in samples] == [ts for ts, _ in expected]  # 6, not 8: deduplicated
    assert [v for _, v in samples] == pytest.approx([v for _, v in expected], abs=1e-12)
    assert set(series["job_energy_method"]["values"]) == {0}
    assert series["job_energy_seq"]["values"] in ([1], [2], [3], [4], [5], [6])


MALFORMED = [
    b"", b"not json", b"{", b"[]", b"null", b"42", b'"a string"', b"\xff\xfe\x00garbage",
    b"[" * 100_000, b'{"schema": 1' + b"0" * 5000 + b"}", b'{"a": NaN}',
    json.dumps({"schema": "energy-agent.job-record/999"}).encode(),
    json.dumps({"schema": "energy-agent.job-record/1"}).encode(),
]


def _mutations(rec: dict) -> list[bytes]:
    out = []
    for path, value in [("energy.kwh", "1.5"), ("energy.kwh", None), ("start", "yesterday"), ("seq", 1.5),
                        ("machine", 7), ("quality.gap_count", "0"), ("energy.by_state", []), ("hash", None),
                        ("emissions.kgco2e", True), ("job", "J-1"), ("end", 12345), ("seq", 2**70),
                        ("start", "0001-01-01T00:00:00.000000Z"),
                        # wrong types, nulls and empty values, one field at a time
                        ("site", None), ("site", ""), ("agent", 5), ("machine", ""), ("record_id", 123),
                        ("record_id", None), ("job.job_id", 7), ("job.program", ["O1"]), ("job.serials", {"a": 1}),
                        ("energy.by_state.processing", "9"), ("energy.by_state.setup", None),
                        ("energy.by_state", {}), ("energy.estimated_kwh", "0"), ("energy.kwh", [1.0]),
                        ("energy.method", 1), ("emissions.factor.value", "0.5"), ("emissions.factor.id", 3),
                        ("emissions.factor", None), ("emissions", []), ("duration_s", "330"),
                        ("quality.coverage", None), ("quality.longest_gap_s", "2.5"),
                        ("quality.counter_resets", 0.5), ("quality", "ok"), ("hash", 12), ("end", None),
                        ("start", None), ("start", "2026-13-45T99:00:00Z"), ("seq", "1")]:
        r = json.loads(json.dumps(rec))
        cur = r
        *parents, last = path.split(".")
        for p in parents:
            cur = cur[p]
        cur[last] = value
        out.append(json.dumps(r).encode())
    r = json.loads(json.dumps(rec))
    r["job"]["job_id"] = r["job"]["key"] = None  # no identifier at all
    out.append(json.dumps(r).encode())
    for field in ("energy", "site", "quality", "emissions", "record_id", "start"):  # missing fields
        r = json.loads(json.dumps(rec))
        del r[field]
        out.append(json.dumps(r).encode())
    r = json.loads(json.dumps(rec))
    r["energy"]["kwh"] = float("inf")
    out.append(json.dumps(r).encode())  # Python writes Infinity, which json.loads reads back
    return out


async def test_bridge_dead_letters_malformed_payloads_and_keeps_working(tmp_path, mosquitto, influxdb, caplog):
    caplog.set_level(logging.WARNING, logger="energy_agent.bridge.bridge")
    influxdb.create_database("bridge_fuzz")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": influxdb.url, "database": "bridge_fuzz",
                                                       "client_id": "bridge-fuzz-test"})
    good = make_records(3, machine="fz")
    bad = MALFORMED + _mutations(good[0]) + [b"x" * 300_000]
    assert len(bad) + 1 >= 50  # the +1: a valid record on the wrong topic
    dl = tmp_path / "dead" / "letters.jsonl"
    async with Running(Bridge(loaded.bridge_settings(), dead_letter_path=dl)) as bridge:
        c = MqttClient(host="127.0.0.1", port=mosquitto.port, client_id="fuzzer", clean_start=True)
        await c.connect(5)
        await asyncio.gather(*(c.publish("energy/v1/s1/gw1/fz/record", p) for p in bad))
        await c.publish("energy/v1/s1/gw1/other-machine/record", payload(good[1]))
        await c.close()
        await publish_all(mosquitto.port, good, "pub-after-fuzz")
        await until(lambda: bridge.written >= 3 and sum(bridge.dead.values()) >= len(bad) + 1, 15, "all handled")
    rows = influxdb.query("SELECT * FROM job_energy", "bridge_fuzz")
    assert sorted(r["record_id"] for r in rows) == sorted(r["record_id"] for r in good)
    entries = [json.loads(line) for line in dl.read_text().splitlines()]
    assert len(entries) == len(bad) + 1
    kept = sorted(e["payload"].encode() if "payload" in e else base64.b64decode(e["payload_base64"])
                  for e in entries)
    assert kept == sorted(bad + [payload(good[1])])  # every payload kept, byte for byte
    reasons = [e["reason"] for e in entries]
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("recursion limit exceeded" in r for r in reasons)
    assert any("unknown schema" in r for r in reasons)
    assert any("record field energy.kwh: Input should be a valid number" in r for r in reasons)
    assert any("record field start: String should match pattern" in r for r in reasons)
    assert any(r.startswith("wrong topic") for r in reasons)
    assert {e["topic"] for e in entries} == {"energy/v1/s1/gw1/fz/record", "energy/v1/s1/gw1/other-machine/record"}
    assert bridge.dead == {"not JSON": 7, "not a record": len(bad) - 7, "wrong topic": 1}
    logged = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(logged) == 3  # once per kind


async def test_bridge_loses_nothing_while_influxdb_or_the_bridge_is_down(tmp_path, mosquitto, caplog):
    """Acks follow writes: what was not written is redelivered, also to the next bridge run."""
    caplog.set_level(logging.INFO, logger="energy_agent.bridge.bridge")
    db = InfluxDB1().start(tmp_path / "influx")
    try:
        db.create_database("energy")
        loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": db.url, "database": "energy",
                                                           "client_id": "bridge-fault-test"})
        recs = make_records(12, machine="flt")

        def make():
            return Bridge(loaded.bridge_settings(), dead_letter_path=tmp_path / "dl.jsonl", retry_min_s=0.05, retry_max_s=0.2)

        async with Running(make()) as bridge:
            await publish_all(mosquitto.port, recs[:2], "pub-f1")
            await until(lambda: len(rows_by_id(db, "energy")) == 2, 10, "2 points")
            db.stop()
            await publish_all(mosquitto.port, recs[2:5], "pub-f2")  # InfluxDB down: received, not acked
            await until(lambda: bridge._failing_since is not None, 10, "a failing write")
        assert bridge.written == 2
        # The bridge is gone; the broker queues for its session.
        await publish_all(mosquitto.port, recs[5:8], "pub-f3")
        db.start(db.workdir)
        async with Running(make()) as bridge:
            await until(lambda: len(rows_by_id(db, "energy")) == 8, 10, "8 points")
            db.stop()  # and once more with the bridge running throughout
            await publish_all(mosquitto.port, recs[8:], "pub-f4")
            await until(lambda: bridge._failing_since is not None, 10, "a failing write")
            db.start(db.workdir)
            await until(lambda: len(rows_by_id(db, "energy")) == 12, 10, "12 points")
        rows = rows_by_id(db, "energy")
        assert len(db.query("SELECT * FROM job_energy", "energy")) == 12
        for rec in recs:
            assert_row_matches(rows[rec["record_id"]], rec)
        failed = [r for r in caplog.records if "write to InfluxDB failed" in r.getMessage()]
        recovered = [r for r in caplog.records if "accepts writes again" in r.getMessage()]
        assert len(failed) == 2 and len(recovered) == 1  # once per outage (the first ended with the bridge)
    finally:
        db.stop()


async def test_bridge_dead_letters_what_influxdb_rejects_and_writes_the_rest(tmp_path, mosquitto, influxdb):
    """A point InfluxDB refuses (here: a field type conflict) is dead-lettered alone; its batch is written."""
    influxdb.create_database("bridge_conflict")
    recs = make_records(4, machine="cf")
    recs[2] = make_record(2, "cf", t0=1_790_000_000.0 + 30 * 86400)  # a month later: another shard
    # An older writer made 'coverage' a string in that shard: record 2 can no longer be written there.
    influxdb.write(f'job_energy,machine=cf,site=s1 coverage="full" {time_ns(recs[2]["start"], "start")}',
                   "bridge_conflict")
    loaded = bridge_config(tmp_path, mosquitto.port, {"api": "v1", "url": influxdb.url,
                                                       "database": "bridge_conflict", "client_id": "bridge-cf"})
    dl = tmp_path / "dl.jsonl"
    async with Running(Bridge(loaded.bridge_settings(), dead_letter_path=dl)) as bridge:
        await publish_all(mosquitto.port, recs, "pub-cf")
        await until(lambda: bridge.written >= 3 and bridge.dead["rejected"] == 1, 10, "3 written, 1 rejected")
    ids = {r["record_id"] for r in influxdb.query("SELECT * FROM job_energy WHERE record_id <> ''",
                                                  "bridge_conflict")}
    assert ids == {r["record_id"] for i, r in enumerate(recs) if i != 2}
    [entry] = [json.loads(line) for line in dl.read_text().splitlines()]
    assert entry["kind"] == "rejected" and "field type conflict" in entry["reason"]
    assert json.loads(entry["payload"])["record_id"] == recs[2]["record_id"]
