"""Records: RFC 8785 canonical form, hashing, chain verification and the ledger that stores them."""

import json
import os
import stat
from datetime import date

import pytest

from energy_agent.records import record
from energy_agent.records.ledger import Ledger
from energy_agent.records.record import (
    GENESIS,
    canonical_json,
    record_hash,
    verify_chain,
)
from tests import factories


def test_rfc8785_example_vector():
    # RFC 8785, section 3.2.2 (input) and 3.2.3 (output).
    value = json.loads(
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(value).decode() == expected


@pytest.mark.parametrize("x, text", [
    (0.0, "0"), (-0.0, "0"), (1.0, "1"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
    (1e-6, "0.000001"), (1e-7, "1e-7"), (-2.5e-7, "-2.5e-7"), (123.456, "123.456"), (5e-324, "5e-324"),
])
def test_numbers_follow_ecmascript(x, text):
    assert canonical_json(x).decode() == text


def test_non_finite_numbers_are_refused():
    with pytest.raises(record.RecordError):
        canonical_json({"kwh": float("nan")})


def _build(seq, prev, **kw):
    return factories.build(seq, prev, **kw)


def test_record_content_and_hash():
    r = _build(1, GENESIS)
    assert r["schema"] == record.SCHEMA and r["seq"] == 1 and r["prev_hash"] == GENESIS
    assert r["energy"]["kwh"] == 1.25 and r["emissions"]["kgco2e"] == pytest.approx(1.25 * 0.6592, abs=1e-9)
    assert r["start"] == "2026-09-21T14:13:20.000000Z" and r["duration_s"] == 300.0
    assert set(r["energy"]["by_state"]) == {"off", "standby", "ready", "processing", "interrupted", "setup"}
    assert r["hash"] == record_hash(r)
    # Deterministic: the same job gives the same id and hash.
    assert _build(1, GENESIS) == r
    assert _build(1, GENESIS, key="J-2")["record_id"] != r["record_id"]


def test_factor_outside_validity_is_flagged():
    expired = factories.FACTOR.model_copy(update={"valid_to": date(2025, 12, 31)})
    assert "factor_outside_validity" in _build(1, GENESIS, factor=expired)["quality"]["flags"]
    assert _build(1, GENESIS)["quality"]["flags"] == []


def _chain(n):
    recs, prev = [], GENESIS
    for i in range(1, n + 1):
        r = _build(i, prev, key=f"J-{i}", start_wall=factories.T0 + 1000 * i)
        recs.append(r)
        prev = r["hash"]
    return recs


def test_verify_chain_detects_tamper_drop_and_reorder():
    recs = _chain(4)
    assert verify_chain(recs) == []
    assert verify_chain(list(reversed(recs))) == []  # order of delivery does not matter
    tampered = [dict(r) for r in recs]
    tampered[1] = dict(tampered[1], energy=dict(tampered[1]["energy"], kwh=0.5))
    assert verify_chain(tampered) == [f"m1 seq 2 ({recs[1]['record_id']}): hash does not match the content"]
    assert verify_chain(recs[:1] + recs[2:]) == ["m1: seq 2..2 missing"]
    forged = dict(recs[2], prev_hash="f" * 64)
    forged["hash"] = record_hash(forged)
    problems = verify_chain([recs[0], recs[1], forged, recs[3]])
    assert problems[0] == f"m1 seq 3 ({recs[2]['record_id']}): prev_hash does not match seq 2"


async def test_ledger_chains_stores_and_drains(tmp_path):
    path = tmp_path / "sub" / "ledger.db"
    ledger = Ledger(path)
    await ledger.open()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for i in range(1, 4):
        rec = await ledger.append("m1", lambda seq, prev, i=i: _build(seq, prev, key=f"J-{i}",
                                                                      start_wall=factories.T0 + 1000 * i))
        assert rec["seq"] == i
    out = await ledger.outbox(10)
    assert [r["seq"] for _, r in out] == [1, 2, 3]
    await ledger.mark_sent([out[0][0]])
    assert await ledger.pending() == 2
    # The same job twice is refused, not stored twice.
    with pytest.raises(record.RecordError, match="already in the ledger"):
        await ledger.append("m1", lambda seq, prev: _build(seq, prev, key="J-1", start_wall=factories.T0 + 1000))
    await ledger.close()
    # Durable: a new process sees everything, and the stored bodies still verify.
    again = Ledger(path)
    recs = again.records()
    again.close_sync()
    assert len(recs) == 3 and verify_chain(recs) == []


async def test_ledger_refuses_a_corrupt_file(tmp_path):
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a database" * 100)
    ledger = Ledger(path)
    with pytest.raises(record.RecordError, match="cannot open the ledger"):
        await ledger.open()
    await ledger.close()


async def test_agent_holds_a_record_while_the_ledger_fails_and_skips_only_duplicates(tmp_path, caplog):
    import yaml

    from energy_agent.app import config
    from energy_agent.app.runtime import Agent

    cfg = yaml.safe_load(open("config/demo.yaml"))
    cfg["ledger"] = {"path": str(tmp_path / "ledger.db")}
    agent = Agent(config.parse(cfg, tmp_path))
    agent.store_retry_s = (0.01, 0.05)
    await agent.ledger.open()
    real_append, failures = agent.ledger.append, []

    async def flaky(machine, build):
        if len(failures) < 3:  # disk full, three times
            failures.append(machine)
            raise record.RecordError("database or disk is full")
        return await real_append(machine, build)

    agent.ledger.append = flaky
    job = factories.finished_job(machine="m1", key="J-9")
    rec = await agent._store(job)
    assert rec is not None and rec["job"]["key"] == "J-9" and len(failures) == 3
    assert sum("holding it and retrying" in r.message for r in caplog.records) == 1  # logged once
    assert await agent._store(job) is None  # the same job again: a duplicate, not a second record
    await agent.ledger.close()
    led = Ledger(tmp_path / "ledger.db")
    assert [r["job"]["key"] for r in led.records()] == ["J-9"]
    led.close_sync()
