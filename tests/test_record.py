"""Records: RFC 8785 canonical form, hashing, chain verification and the ledger that stores them."""

import json
import os
import stat
from datetime import date

import pytest

from energy_agent.core.errors import RecordError
from energy_agent.core.record import GENESIS, SCHEMA_JOB, JobRecordV1, canonical_json, parse_record
from energy_agent.records.ledger import Ledger
from energy_agent.records.record import verify_chain
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
    with pytest.raises(RecordError):
        canonical_json({"kwh": float("nan")})


def _build(seq, prev, **kw):
    return factories.build(seq, prev, **kw)


def test_record_content_and_hash():
    r = _build(1, GENESIS)
    assert r.schema == SCHEMA_JOB and r.seq == 1 and r.prev_hash == GENESIS
    assert r.energy.kwh == 1.25 and r.emissions.kgco2e == pytest.approx(1.25 * 0.6592, abs=1e-9)
    assert r.start == "2026-09-21T14:13:20.000000Z" and r.duration_s == 300.0
    assert set(r.to_json()["energy"]["by_state"]) == {"off", "standby", "ready", "processing", "interrupted", "setup"}
    assert r.hash == r.body_hash()
    # Deterministic: the same job gives the same id and hash.
    assert _build(1, GENESIS) == r
    assert _build(1, GENESIS, key="J-2").record_id != r.record_id


def test_record_round_trips_through_its_canonical_json():
    r = _build(1, GENESIS)
    assert parse_record(r.canonical()) == r
    assert parse_record(r.to_json()) == r
    assert parse_record(r.canonical()).canonical() == r.canonical()


def test_a_stored_record_of_schema_1_is_still_read_and_verified():
    """A record of schema 1, as an earlier version wrote it (canonical JSON, verbatim), parses
    to the same bytes and hashes to its own hash: ledgers written before schema 2 still verify."""
    # Written by the agent before this change (tests/factories.build(1, GENESIS), commit 2ac8d28).
    stored = (b'{"agent":"gw","allocation":"direct","cnc":null,"duration_s":300,"emissions":{"factor":{"authority":"'
              b'MONRE DCC","basis":"location","document":"notice 2023","id":"vn-2023","method":"CDM combined margin"'
              b',"region":"VN","unit":"kgCO2e/kWh","valid_from":null,"valid_to":null,"value":0.6592,"year":2023},"kg'
              b'co2e":0.824},"end":"2026-09-21T14:18:20.000000Z","energy":{"by_state":{"interrupted":0.1,"off":0,"pr'
              b'ocessing":1,"ready":0.05,"setup":0.1,"standby":0},"estimated_kwh":0,"kwh":1.25,"method":"counter"},"'
              b'hash":"af9d9be88851cc9d205ecd8fee81a05fb08d8c4c93988542c25aebf9a30ff2af","job":{"end_reason":"key_cl'
              b'eared","job_id":"J-1","key":"J-1","parts":1,"product":"SPU-40","program":"O1001","serial":"SN-1","su'
              b'bassembly":"spindle"},"machine":"m1","meter":{"accuracy":"class 1","boundary":null,"calibration":{"c'
              b'ertificate":"C-1","valid_until":null},"id":"pm-1","profile":"eastron-sdm630"},"prev_hash":"000000000'
              b'0000000000000000000000000000000000000000000000000000000","provenance":{"agent_version":"0.1.0","conf'
              b'ig_hash":"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","kernel":"job_energy/3"}'
              b',"quality":{"bad_samples":0,"counter_jumps":0,"counter_resets":0,"counter_rollovers":0,"coverage":1,'
              b'"estimated_share":0,"flags":[],"gap_count":0,"longest_gap_s":0,"median_interval_s":1,"samples":301},'
              b'"record_id":"de1441b0db610c04547c6fd08123c0d1","schema":"energy-agent.job-record/1","seq":1,"site":"'
              b'plant","start":"2026-09-21T14:13:20.000000Z"}')
    r = parse_record(stored)
    assert isinstance(r, JobRecordV1)  # read as what it is, never rewritten
    assert r.canonical() == stored  # byte for byte: nothing added, dropped or reformatted
    assert r.body_hash() == r.hash == "af9d9be88851cc9d205ecd8fee81a05fb08d8c4c93988542c25aebf9a30ff2af"
    assert verify_chain([r]) == []


@pytest.mark.parametrize("change, message", [
    (lambda d: d["energy"].update(kwh="1.25"), "record field energy.kwh: Input should be a valid number"),
    (lambda d: d["energy"].update(kwh=True), "record field energy.kwh: Input should be a valid number"),
    (lambda d: d.update(seq=2.0), "record field seq: Input should be a valid integer"),
    (lambda d: d["quality"].pop("coverage"), "record field quality.coverage: Field required"),
    (lambda d: d.update(extra=1), "record field extra: Unexpected keyword argument"),
    (lambda d: d.update(schema="energy-agent.job-record/9"), "record field schema: unknown schema"),
    (lambda d: d.update(hash="xyz"), "record field hash: String should match pattern"),
    (lambda d: d.update(start="2026-09-21 14:13:20"), "record field start: String should match pattern"),
    (lambda d: d["energy"].update(method="guess"), "record field energy.method: Input should be"),
    (lambda d: d.update(machine="a/b"), "record field machine: String should match pattern"),
])
def test_parse_refuses_what_is_not_a_record_and_names_the_field(change, message):
    d = _build(1, GENESIS).to_json()
    change(d)
    with pytest.raises(RecordError, match=message.replace(".", r"\.")):
        parse_record(d)


@pytest.mark.parametrize("payload, message", [
    (b"not json", "not JSON"), (b"[1, 2]", "the payload is not a record"), (b"null", "the payload is not a record"),
    (b'{"a": 1e999}', "record field"), (b"\xff\xfe", "not JSON"),
])
def test_parse_refuses_payloads_that_are_not_records(payload, message):
    with pytest.raises(RecordError, match=message):
        parse_record(payload)


def test_factor_outside_validity_is_flagged():
    expired = factories.FACTOR.model_copy(update={"valid_to": date(2025, 12, 31)})
    assert "factor_outside_validity" in _build(1, GENESIS, factor=expired).quality.flags
    assert _build(1, GENESIS).quality.flags == ()


def _chain(n):
    recs, prev = [], GENESIS
    for i in range(1, n + 1):
        r = _build(i, prev, key=f"J-{i}", start_wall=factories.T0 + 1000 * i)
        recs.append(r)
        prev = r.hash
    return recs


def test_verify_chain_detects_tamper_drop_and_reorder():
    recs = _chain(4)
    assert verify_chain(recs) == []
    assert verify_chain(list(reversed(recs))) == []  # order of delivery does not matter
    tampered = list(recs)
    tampered[1] = factories.edited(recs[1], lambda d: d["energy"].update(kwh=0.5))
    assert verify_chain(tampered) == [f"m1 seq 2 ({recs[1].record_id}): hash does not match the content"]
    assert verify_chain(recs[:1] + recs[2:]) == ["m1: seq 2..2 missing"]
    forged = factories.edited(recs[2], lambda d: d.update(prev_hash="f" * 64)).with_hash()
    problems = verify_chain([recs[0], recs[1], forged, recs[3]])
    assert problems[0] == f"m1 seq 3 ({recs[2].record_id}): prev_hash does not match seq 2"


async def test_ledger_chains_stores_and_drains(tmp_path):
    path = tmp_path / "sub" / "ledger.db"
    ledger = Ledger(path)
    await ledger.open()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for i in range(1, 4):
        rec = await ledger.append("m1", lambda seq, prev, i=i: _build(seq, prev, key=f"J-{i}",
                                                                      start_wall=factories.T0 + 1000 * i))
        assert rec.seq == i
    out = await ledger.outbox(10)
    assert [r.seq for _, r in out] == [1, 2, 3]
    await ledger.mark_sent([out[0][0]])
    assert await ledger.pending() == 2
    # The same job twice is refused, not stored twice.
    with pytest.raises(RecordError, match="already in the ledger"):
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
    with pytest.raises(RecordError, match="cannot open the ledger"):
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
            raise RecordError("database or disk is full")
        return await real_append(machine, build)

    agent.ledger.append = flaky
    job = factories.finished_job(machine="m1", key="J-9")
    rec = await agent._store(job)
    assert rec is not None and rec.job.key == "J-9" and len(failures) == 3
    assert sum("holding it and retrying" in r.message for r in caplog.records) == 1  # logged once
    assert await agent._store(job) is None  # the same job again: a duplicate, not a second record
    await agent.ledger.close()
    led = Ledger(tmp_path / "ledger.db")
    assert [r.job.key for r in led.records()] == ["J-9"]
    led.close_sync()
