"""Records: RFC 8785 canonical form, hashing, chain verification and the ledger that stores them."""

import json
import os
import stat
from types import SimpleNamespace

import pytest

from agent import record
from agent.config import Calibration, EmissionFactor, MeterDevice
from agent.ledger import Ledger
from agent.record import GENESIS, canonical_json, record_hash, verify_chain


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


FACTOR = EmissionFactor(value=0.6592, authority="MONRE DCC", document="notice 2023", region="VN", year=2023,
                        method="CDM combined margin", basis="location")
METER = MeterDevice(id="pm-1", host="127.0.0.1", profile="eastron-sdm630", accuracy="class 1",
                    calibration=Calibration(certificate="C-1"))


def _job(key="J-1", start=1_790_000_000.0, kwh=1.25):
    energy = SimpleNamespace(kwh=kwh, estimated_kwh=0.0, method="counter",
                             kwh_by_state=(0.0, 0.0, 0.05, kwh - 0.25, 0.1, 0.1), coverage=1.0, gap_count=0,
                             longest_gap_s=0.0, counter_resets=0, counter_rollovers=0, counter_jumps=0)
    info = SimpleNamespace(key=key, job_id=key, program="O1001", product="SPU-40", serial="SN-1",
                           subassembly="spindle", start=100.0, start_wall=start)
    return SimpleNamespace(machine="m1", info=info, end=400.0, end_wall=start + 300.0, end_reason="key_cleared",
                           parts=1, energy=energy, samples=301, bad_samples=0, median_interval_s=1.0, flags=())


def _build(seq, prev, **kw):
    return record.build(site="plant", agent="gw", seq=seq, prev_hash=prev, job=_job(**kw), factor_id="vn-2023",
                        factor=FACTOR, meter=METER, profile="eastron-sdm630", cnc=None, config_hash="c" * 64)


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
    global FACTOR
    old = FACTOR
    try:
        FACTOR = old.model_copy(update={"valid_to": __import__("datetime").date(2025, 12, 31)})
        assert "factor_outside_validity" in _build(1, GENESIS)["quality"]["flags"]
    finally:
        FACTOR = old


def _chain(n):
    recs, prev = [], GENESIS
    for i in range(1, n + 1):
        r = _build(i, prev, key=f"J-{i}", start=1_790_000_000.0 + 1000 * i)
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
                                                                      start=1_790_000_000.0 + 1000 * i))
        assert rec["seq"] == i
    out = await ledger.outbox(10)
    assert [r["seq"] for _, r in out] == [1, 2, 3]
    await ledger.mark_sent([out[0][0]])
    assert await ledger.pending() == 2
    # The same job twice is refused, not stored twice.
    with pytest.raises(record.RecordError, match="already in the ledger"):
        await ledger.append("m1", lambda seq, prev: _build(seq, prev, key="J-1", start=1_790_001_000.0))
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
