"""`energy-agent jobs` and `verify` on a ledger written by the agent's own code."""

import csv
import io
import json
import sqlite3

import yaml

from energy_agent.app.cli import main
from energy_agent.records.ledger import Ledger
from tests import factories


async def _ledger(tmp_path):
    cfg = yaml.safe_load(open("config/demo.yaml"))
    cfg["ledger"] = {"path": "ledger.db"}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(cfg))
    led = Ledger(tmp_path / "ledger.db")
    for machine in ("m1", "m2"):
        await factories.fill(led, machine, 3, first=0, site="demo-plant", agent="demo-gw")
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
    assert {r["job"] for r in rows} == {"J-1", "J-2"} and float(rows[0]["kwh"]) == 0.6


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
