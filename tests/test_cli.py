"""`energy-agent jobs` and `verify` on a ledger written by the agent's own code."""

import csv
import io
import json
import sqlite3
from types import SimpleNamespace

import yaml

from agent import record
from agent.cli import main
from agent.config import EmissionFactor, MeterDevice
from agent.ledger import Ledger

FACTOR = EmissionFactor(value=0.6592, authority="MONRE DCC", document="notice", region="VN", year=2023,
                        basis="location")
METER = MeterDevice(id="pm-1", host="127.0.0.1", profile="eastron-sdm630")


def _job(machine, i):
    energy = SimpleNamespace(kwh=0.5 + i, estimated_kwh=0.0, method="counter", kwh_by_state=(0, 0, 0, 0.5 + i, 0, 0),
                             coverage=1.0, gap_count=0, longest_gap_s=0.0, counter_resets=0, counter_rollovers=0,
                             counter_jumps=0)
    info = SimpleNamespace(key=f"J-{i}", job_id=f"J-{i}", program="O1", product="P", serial=f"S-{i}",
                           subassembly=None, start=0.0, start_wall=1_790_000_000.0 + 1000 * i)
    return SimpleNamespace(machine=machine, info=info, end=10.0, end_wall=1_790_000_010.0 + 1000 * i,
                           end_reason="key_cleared", parts=1, energy=energy, samples=10, bad_samples=0,
                           median_interval_s=1.0, flags=())


async def _ledger(tmp_path):
    cfg = yaml.safe_load(open("config/demo.yaml"))
    cfg["ledger"] = {"path": "ledger.db"}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(cfg))
    led = Ledger(tmp_path / "ledger.db")
    for machine in ("m1", "m2"):
        for i in range(3):
            await led.append(machine, lambda seq, prev, m=machine, i=i: record.build(
                site="demo-plant", agent="demo-gw", seq=seq, prev_hash=prev, job=_job(m, i), factor_id="vn-2023",
                factor=FACTOR, meter=METER, profile="eastron-sdm630", cnc=None, config_hash="c" * 64))
    await led.close()
    return tmp_path / "plant.yaml"


async def test_jobs_lists_records_as_table_json_and_csv(tmp_path, capsys):
    cfg = await _ledger(tmp_path)
    assert main(["jobs", "-c", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["machine", "seq", "job", "program"] and len(lines) == 7
    assert main(["jobs", "-c", str(cfg), "--machine", "m2", "--format", "json"]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["machine"], r["seq"]) for r in recs] == [("m2", 1), ("m2", 2), ("m2", 3)]
    assert main(["jobs", "-c", str(cfg), "--format", "csv", "--since", "2026-09-21T14:30:00Z"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["job"] for r in rows} == {"J-1", "J-2"} and float(rows[0]["kwh"]) == 1.5


async def test_verify_passes_then_catches_an_edited_record(tmp_path, capsys):
    cfg = await _ledger(tmp_path)
    assert main(["verify", "-c", str(cfg)]) == 0
    assert "6 records, 2 machines: chains intact" in capsys.readouterr().out
    db = sqlite3.connect(tmp_path / "ledger.db")
    body = json.loads(db.execute("SELECT body FROM records WHERE machine='m1' AND seq=2").fetchone()[0])
    body["energy"]["kwh"] = 0.1  # someone edits the evidence
    db.execute("UPDATE records SET body=? WHERE machine='m1' AND seq=2", (json.dumps(body),))
    db.commit()
    db.close()
    assert main(["verify", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "m1 seq 2" in out and "hash does not match the content" in out


def test_jobs_without_a_ledger_is_a_clear_error(tmp_path, capsys):
    cfg = yaml.safe_load(open("config/demo.yaml"))
    cfg["ledger"] = {"path": "missing.db"}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["jobs", "-c", str(tmp_path / "plant.yaml")]) == 2
    assert "ledger.path:" in capsys.readouterr().err
