"""Delivery pieces on real services: bridge confirmations, shared subscriptions, retained
status, ledger retention, and a ledger on a file system that fills up or turns read-only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from energy_agent.app import config
from energy_agent.bridge.bridge import Bridge
from energy_agent.delivery.mqtt import MqttClient
from energy_agent.delivery.outbox import Publisher
from energy_agent.delivery.status import Status, offline_payload, status_topic
from energy_agent.records.ledger import Ledger
from energy_agent.records.record import verify_chain
from energy_agent.simulators.services import Mosquitto
from tests import factories
from tests.factories import until

ROOT = Path(__file__).resolve().parents[1]


def bridge_loaded(tmp_path: Path, port: int, influx: dict) -> config.Loaded:
    return config.parse({"site": "s", "agent_id": "a", "emission_factors": {"vn-2023": factories.FACTOR.model_dump()},
                         "meters": [], "cncs": [], "machines": [],
                         "mqtt": {"host": "127.0.0.1", "port": port}, "influx": influx}, tmp_path)


async def unconfirmed(ledger: Ledger) -> int:
    rows = await ledger._run(ledger._query, "SELECT count(*) FROM records WHERE confirmed_at IS NULL", ())
    return int(rows[0][0])


@contextlib.asynccontextmanager
async def publishing(tmp_path: Path, subscription: str, **publisher_kw):
    """A broker, a ledger, the agent's client with a running Publisher (``publisher_kw``) and a
    consumer subscribed to ``subscription``; everything stopped afterwards."""
    broker = Mosquitto().start(tmp_path / "broker")
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    agent = MqttClient(host="127.0.0.1", port=broker.port, client_id="agent-under-test")
    consumer = MqttClient(host="127.0.0.1", port=broker.port, client_id="consumer", clean_start=True)
    stop = asyncio.Event()
    task = None
    try:
        await consumer.connect(5)
        await consumer.subscribe(subscription, qos=1)
        await agent.connect(5)
        publisher = Publisher(ledger, agent, topic_prefix="energy/v1", **publisher_kw)
        task = asyncio.create_task(publisher.run(stop))
        yield ledger, publisher, consumer
    finally:
        stop.set()
        if task:
            await task
        await agent.close()
        await consumer.close()
        await ledger.close()
        broker.stop()


# ------------------------------------------------------------------ confirmations, shared subscriptions


async def test_two_bridges_share_a_subscription_and_confirm_every_record(tmp_path, influxdb):
    """Two bridges in one $share group split 300 records; each lands once; the agent's ledger
    gets a confirmation for every record, and none is published again."""
    broker = Mosquitto().start(tmp_path / "broker")
    influxdb.create_database("shared")
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    influx = {"api": "v1", "url": influxdb.url, "database": "shared", "confirm_as": "store-a",
              "subscription": "$share/bridges/energy/v1/+/+/+/record"}
    bridges = [Bridge(bridge_loaded(tmp_path / f"b{i}", broker.port, {**influx, "client_id": f"bridge-{i}"}).bridge_settings(),
                      dead_letter_path=tmp_path / f"dl{i}.jsonl") for i in (1, 2)]
    client = MqttClient(host="127.0.0.1", port=broker.port, client_id="agent-shared")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(b.run(stop)) for b in bridges]
    pub_task = None
    try:
        await until(lambda: all(b.ready.is_set() for b in bridges), 15, "both bridges subscribed")
        await client.connect(5)
        publisher = Publisher(ledger, client, topic_prefix="energy/v1", confirm_by=frozenset({"store-a"}),
                              resend_after_s=60.0, confirm_topic="energy/v1/s/a/confirm")
        pub_task = asyncio.create_task(publisher.run(stop))
        for m in ("m1", "m2", "m3"):
            await factories.fill(ledger, m, 100, site="s", agent="a")
        publisher.notify()
        await until(lambda: unconfirmed_is_zero(ledger), 60, "every record confirmed")
        rows = influxdb.query("SELECT * FROM job_energy", "shared")
        ids = [r["record_id"] for r in rows]
        assert len(ids) == len(set(ids)) == 300
        assert {r.record_id for r in ledger.records()} == set(ids)
        written = [b.written for b in bridges]
        assert sum(written) >= 300 and min(written) > 0, f"the load was not split: {written}"
        assert publisher.confirmed == 300 and publisher.resent == 0
    finally:
        stop.set()
        await asyncio.gather(*tasks, *( [pub_task] if pub_task else []), return_exceptions=True)
        await client.close()
        await ledger.close()
        broker.stop()


async def unconfirmed_is_zero(ledger: Ledger) -> bool:
    return await unconfirmed(ledger) == 0 and await ledger.pending() == 0


async def test_unconfirmed_records_are_published_again(tmp_path, caplog):
    """Without a confirmation within resend_after_s a record goes out again; a confirmation
    from a bridge the agent does not wait for, or a malformed one, changes nothing."""
    caplog.set_level(logging.WARNING, logger="energy_agent.delivery.outbox")
    async with publishing(tmp_path, "energy/v1/s/a/+/record", confirm_by=frozenset({"store"}),
                          resend_after_s=1.0, confirm_topic="energy/v1/s/a/confirm") as (ledger, publisher, consumer):
        recs = await factories.fill(ledger, "m1", 3, site="s", agent="a")
        publisher.notify()
        seen: list[str] = []

        async def got(n):
            while (m := await consumer.next_message(timeout=0.05)) is not None:
                seen.append(m.payload.decode())
            return len(seen) >= n

        await until(lambda: got(6), 10, "each record published twice")  # no confirmation: resent
        await consumer.publish("energy/v1/s/a/confirm", b'{"by": "other", "records": ["x"]}')
        await consumer.publish("energy/v1/s/a/confirm", b"not json")
        await consumer.publish("energy/v1/s/a/confirm",
                               ('{"by": "store", "records": [%s]}' % ",".join(f'"{r.record_id}"' for r in recs))
                               .encode())
        await until(lambda: unconfirmed_is_zero(ledger), 10, "the confirmation stored")
        # A confirmed record stays put: wait for outbox scans whose resend cut-off is past the
        # confirmation, when any unconfirmed record would have gone out again, then once more
        # for anything still on its way to the consumer.
        confirmed_at = time.time()
        await until(lambda: publisher.resend_cutoff > confirmed_at, 10, "a resend scan after the confirmation")
        await got(0)
        n = len(seen)
        later = time.time()
        await until(lambda: publisher.resend_cutoff > later, 10, "another resend scan")
        await got(0)
        assert len(seen) == n
        assert publisher.confirmed == 3
        assert sum("malformed confirmation" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------ status and availability


async def test_status_is_retained_and_the_will_says_offline(tmp_path):
    broker = Mosquitto().start(tmp_path / "broker")
    topic = status_topic("energy/v1", "s", "a")
    agent = MqttClient(host="127.0.0.1", port=broker.port, client_id="agent-status",
                       will=(topic, offline_payload(), 1, True), keepalive=5)
    stop = asyncio.Event()
    status = Status(agent, prefix="energy/v1", site="s", agent="a", wall=time.time)
    task = None
    try:
        await agent.connect(5)
        task = asyncio.create_task(status.run(stop))
        status.device("pm-1", True)
        status.device("cnc-1", False, "connection refused")
        status.device("pm-1", True)  # no change: not published again

        async def retained() -> dict[str, bytes]:
            c = MqttClient(host="127.0.0.1", port=broker.port, client_id=f"late-{time.monotonic_ns()}",
                           clean_start=True)
            await c.connect(5)
            try:
                await c.subscribe("energy/v1/s/a/#", qos=1)
                out = {}
                while (m := await c.next_message(timeout=0.5)) is not None:
                    out[m.topic] = m.payload  # a new subscriber gets them: they are retained
                return out
            finally:
                await c.close()

        got = await until(lambda: _has(retained, 3), 10, "three retained status messages")
        assert json.loads(got[topic])["state"] == "online"
        assert json.loads(got["energy/v1/s/a/device/pm-1/availability"])["state"] == "online"
        cnc = json.loads(got["energy/v1/s/a/device/cnc-1/availability"])
        assert cnc["state"] == "offline" and cnc["error"] == "connection refused"
        # The broker, not the agent, says it is gone when the connection dies uncleanly.
        agent._c.socket().close()  # a cut cable: no DISCONNECT sent
        got = await until(lambda: _has(retained, 3, lambda g: json.loads(g[topic])["state"] == "offline"), 20,
                          "the last will")
    finally:
        stop.set()
        if task:
            await task
        await agent.close()
        broker.stop()


async def _has(fetch, n, extra=lambda g: True):
    got = await fetch()
    return got if len(got) >= n and extra(got) else None


# ------------------------------------------------------------------ retention


async def test_pruning_keeps_chain_heads_verifiable(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        for m in ("m1", "m2"):
            await factories.fill(ledger, m, 10, site="s", agent="a")
        rows = await ledger.outbox(100)
        await ledger.mark_sent([rid for rid, _ in rows])
        ids = {r.record_id: r for _, r in rows}
        m1 = [r for r in ids.values() if r.machine == "m1"]
        # m1: all confirmed but seq 7; m2: all confirmed.
        await ledger.confirm([r.record_id for r in m1 if r.seq != 7], "store", frozenset({"store"}))
        await ledger.confirm([r.record_id for r in ids.values() if r.machine == "m2"], "store",
                             frozenset({"store"}))
        pruned = await ledger.prune(time.time() + 1, need_confirmed=True)
        assert pruned == {"m1": 6, "m2": 9}  # m1 stops before the unconfirmed seq 7; m2 keeps its head
        left = ledger.records()
        assert sorted((r.machine, r.seq) for r in left) == [("m1", s) for s in (7, 8, 9, 10)] + [("m2", 10)]
        anchors = ledger.anchors()
        assert anchors["m1"][0] == 6 and anchors["m2"][0] == 9
        assert verify_chain(left, anchors) == []
        assert verify_chain(left) == ["m1: seq 1..6 missing (and no prune anchor)",
                                      "m2: seq 1..9 missing (and no prune anchor)"]
        forged = dict(anchors, m2=(9, "f" * 64))
        assert verify_chain(left, forged) == [f"m2 seq 10 ({left[-1].record_id}): prev_hash does not match seq 9"]
        await factories.fill(ledger, "m2", 2, first=11, site="s", agent="a")  # the chain goes on
        assert verify_chain(ledger.records(), ledger.anchors()) == []
    finally:
        await ledger.close()


def test_verify_command_uses_the_anchors(tmp_path):
    async def prepare():
        ledger = Ledger(tmp_path / "var" / "ledger.db")
        await ledger.open()
        await factories.fill(ledger, "m1", 5, site="s", agent="a")
        await ledger.mark_sent([rid for rid, _ in await ledger.outbox(10)])
        await ledger.prune(time.time() + 1, need_confirmed=False)
        await ledger.close()

    asyncio.run(prepare())
    cfg = (ROOT / "config" / "demo.yaml").read_text().replace("ledger: {path: ledger.db}",
                                                              "ledger: {path: var/ledger.db}")
    (tmp_path / "plant.yaml").write_text(cfg)
    out = subprocess.run([sys.executable, "-m", "energy_agent", "verify", "-c", str(tmp_path / "plant.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 records, 1 machines: chains intact" in out.stdout


# ------------------------------------------------------------------ the ledger's file system


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a small file system needs root"
    probe = Path("/proc/self/mountinfo")
    return None if probe.exists() else "no /proc/self/mountinfo"


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: fill it to make the disk full, remount it read-only."""
    why = _can_mount()
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if why is None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        why = None if r.returncode == 0 else f"mount failed: {r.stderr.strip()}"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot make a small file system for the ledger tests: {why}")
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def _agent(tmp_path: Path, ledger_path: Path, hold_max: int):
    from energy_agent.app.runtime import Agent

    text = (ROOT / "config" / "demo.yaml").read_text()
    data = yaml.safe_load(text)
    data["ledger"] = {"path": str(ledger_path), "hold_max": hold_max}
    data.pop("mqtt")
    return Agent(config.parse(data, tmp_path))


async def test_disk_full_holds_records_then_stores_them(tmp_path, small_fs, caplog):
    caplog.set_level(logging.INFO, logger="energy_agent.app.runtime")
    agent = _agent(tmp_path, small_fs / "ledger.db", hold_max=50)
    agent.store_retry_s = (0.05, 0.2)
    await agent.ledger.open()
    recorder = asyncio.create_task(agent._recorder())
    filler = small_fs / "filler"
    try:
        # Fill the file system, leaving no room for another page.
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        jobs = [factories.pending_job(machine="m1", key=f"J-{i}", start_wall=factories.T0 + 1000 * i,
                                      kwh=0.1 * (i + 1)) for i in range(20)]
        for j in jobs:
            agent._finished(j)
        await until(lambda: any("cannot store the record" in r.getMessage() for r in caplog.records), 10,
                    "the ledger error")
        assert agent.stats.records < 20 and agent.fatal is None
        filler.unlink()  # space again: every held job is stored, in order, once
        await until(lambda: agent.stats.records == 20, 20, "the held records stored")
        recs = agent.ledger.records()
        assert [r.job.key for r in recs] == [f"J-{i}" for i in range(20)]
        assert verify_chain(recs) == []
        errors = [r for r in caplog.records if "cannot store the record" in r.getMessage()]
        assert len(errors) == 1 and "full" in errors[0].getMessage()  # logged once, with SQLite's cause
        assert any("ledger accepts records again" in r.getMessage() for r in caplog.records)
    finally:
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
        await agent.ledger.close()


async def test_read_only_ledger_holds_up_to_the_bound_then_stops(tmp_path, small_fs, caplog):
    agent = _agent(tmp_path, small_fs / "ledger.db", hold_max=5)
    agent.store_retry_s = (0.05, 0.2)
    stop = asyncio.Event()
    agent._stop = stop
    await agent.ledger.open()
    await agent.ledger.append("m1", lambda seq, prev: factories.build(seq, prev, machine="m1", key="J-0"))
    await agent.ledger.release()  # a file system with a file open for writing cannot turn read-only
    _remount(small_fs, "ro")
    recorder = asyncio.create_task(agent._recorder())
    try:
        for i in range(1, 8):
            agent._finished(factories.pending_job(machine="m1", key=f"J-{i}", start_wall=factories.T0 + 1000 * i))
            await asyncio.sleep(0.05)
        assert stop.is_set() and agent.fatal and "hold" in agent.fatal
        crit = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert crit and "J-7" in crit[0] and "hold_max (5)" in crit[0]  # what could not be kept is named
        _remount(small_fs, "rw")
        await until(lambda: agent.stats.records == 6, 20, "the held records stored")
        assert [r.job.key for r in agent.ledger.records()] == [f"J-{i}" for i in range(7)]
    finally:
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
        await agent.ledger.close()


def test_corrupt_ledger_at_start_is_a_clear_error(tmp_path):
    ledger = tmp_path / "ledger.db"
    ledger.write_bytes(b"this is not an SQLite database" * 100)
    cfg = (ROOT / "config" / "demo.yaml").read_text().replace("ledger: {path: ledger.db}",
                                                              f"ledger: {{path: '{ledger}'}}")
    (tmp_path / "plant.yaml").write_text(cfg)
    out = subprocess.run([sys.executable, "-m", "energy_agent", "run", "-c", str(tmp_path / "plant.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert f"{ledger}: cannot open the ledger: file is not a database" in out.stderr
    assert ledger.read_bytes().startswith(b"this is not an SQLite database")  # left as it was, for forensics


async def test_records_of_an_earlier_agent_id_go_to_their_own_topic(tmp_path):
    """Each record's topic comes from the record: a ledger that holds records from before an id
    change publishes each under its own site and agent."""
    async with publishing(tmp_path, "energy/v1/#") as (ledger, publisher, consumer):
        await factories.fill(ledger, "m1", 2, site="s", agent="old-gw")
        await factories.fill(ledger, "m2", 2, site="s", agent="gw")
        await factories.fill(ledger, "m1", 1, first=3, site="s", agent="old-gw")
        publisher.notify()
        got = []
        while len(got) < 5:
            m = await consumer.next_message(timeout=10)
            assert m is not None, got
            got.append((m.topic, json.loads(m.payload)["agent"]))
        assert sorted(got) == sorted([("energy/v1/s/old-gw/m1/record", "old-gw")] * 3
                                     + [("energy/v1/s/gw/m2/record", "gw")] * 2)
