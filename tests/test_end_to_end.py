"""End to end with real processes: simulators → agent → Mosquitto → bridges → InfluxDB 1.6.7 and
VictoriaMetrics (v2 write path), compared with the simulators' closed-form truth.

One run of the demo scenario (two machines, back-to-back jobs, an interrupted phase; an Eastron
SDM630 float32 kWh counter and a Schneider iEM3000 int64 Wh counter) feeds two bridges at once:
one writes InfluxDB 1.6.7 through v1 ``/write``, the other VictoriaMetrics through the
influxdb-client v2 API. Every job must land exactly once in each, with the ledger's values,
within max(0.1 %, 2 counter steps) of the truth.
"""

from __future__ import annotations

import time

import pytest

from energy_agent.app.demo import tolerance_kwh
from energy_agent.bridge.lineproto import time_ns
from energy_agent.core.record import Record
from energy_agent.records.ledger import Ledger
from energy_agent.records.record import verify_chain
from energy_agent.simulators.plant import PlantRun


@pytest.fixture(scope="module")
def plant_run(tmp_path_factory, mosquitto, influxdb, victoria):
    influxdb.create_database("energy")
    stores = {
        "influx1": {"api": "v1", "url": influxdb.url, "database": "energy"},
        "victoria": {"api": "v2", "url": victoria.url, "org": "plant", "bucket": "energy",
                     "token_env": "ENERGY_TEST_TOKEN"},
    }
    run = PlantRun(tmp_path_factory.mktemp("plant"), mosquitto.port, stores)
    truth = run.truth()
    with run:
        run.start()
        ledger_path = run.workdir / "ledger.db"

        def ledger_complete():
            if not ledger_path.exists():
                return None
            led = Ledger(ledger_path)
            try:
                recs = [r.to_json() for r in led.records()]  # the records' JSON form: the contract
            finally:
                led.close_sync()
            return recs if len(recs) >= len(truth) else None

        timeout = run.end_wall - time.time() + 60
        records = run.wait_until(ledger_complete, timeout, f"{len(truth)} records in the ledger")
        rows_v1 = run.wait_until(
            lambda: (r := influxdb.query("SELECT * FROM job_energy", "energy")) and len(r) >= len(truth) and r,
            30, "all points in InfluxDB 1.6.7")

        def vm_rows():
            victoria.force_flush()
            series = victoria.export('{__name__=~"job_energy_kwh"}')
            return series if sum(len(s["values"]) for s in series) >= len(truth) else None

        vm_series = run.wait_until(vm_rows, 30, "all points in VictoriaMetrics")
        codes = run.stop()
    return {"truth": truth, "records": records, "v1": rows_v1, "vm": vm_series, "codes": codes, "run": run}


def test_every_job_recorded_once_within_tolerance(plant_run):
    truth, records = plant_run["truth"], plant_run["records"]
    assert len(truth) >= 6
    by_job = {(r["machine"], r["job"]["job_id"]): r for r in records}
    assert len(by_job) == len(records) == len(truth), "a job recorded twice or a record without job id"
    profiles = plant_run["run"].profiles()
    for t in truth:
        r = by_job[(t["machine"], t["job_id"])]
        # Tolerance: max(0.1 % of the truth, 2 steps of the counter register at its value), as
        # the energy at each boundary is only known to the register's resolution.
        tol = tolerance_kwh(profiles[t["machine"]], t["counter_end_kwh"], t["kwh"])
        assert abs(r["energy"]["kwh"] - t["kwh"]) <= tol, (t["job_id"], r["energy"]["kwh"], t["kwh"], tol)
        for state, kwh in t["by_state"].items():
            assert abs(r["energy"]["by_state"][state] - kwh) <= tol, (t["job_id"], state)
        assert r["energy"]["method"] == "counter" and r["quality"]["coverage"] == 1.0
        assert r["quality"]["flags"] == [], r["quality"]["flags"]
        assert r["job"]["program"] == t["program"] and r["job"]["serial"] == t["serial"]
        assert r["job"]["product"] == t["product"] and r["job"]["subassembly"] == t["subassembly"]
        assert r["job"]["parts"] == t["parts"]
    assert verify_chain([Record.parse(r) for r in records]) == []


def test_influxdb_v1_has_each_record_once_with_ledger_values(plant_run):
    records = {r["record_id"]: r for r in plant_run["records"]}
    rows = plant_run["v1"]
    assert sorted(row["record_id"] for row in rows) == sorted(records)
    for row in rows:
        rec = records[row["record_id"]]
        assert row["kwh"] == pytest.approx(rec["energy"]["kwh"], abs=1e-12)
        assert row["kgco2e"] == pytest.approx(rec["emissions"]["kgco2e"], abs=1e-12)
        assert row["machine"] == rec["machine"] and row["serial"] == rec["job"]["serial"]
        assert row["hash"] == rec["hash"]


def test_victoriametrics_v2_path_has_each_record_once(plant_run):
    # VictoriaMetrics turns field kwh into the series job_energy_kwh (one per tag set) and keeps
    # millisecond timestamps: one sample per record, at the job start, with the ledger's kWh.
    got = sorted((s["metric"]["machine"], ts, v) for s in plant_run["vm"]
                 for ts, v in zip(s["timestamps"], s["values"]))
    want = sorted((r["machine"], time_ns(r["start"], "start") // 1_000_000, r["energy"]["kwh"])
                  for r in plant_run["records"])
    assert [(m, ts) for m, ts, _ in got] == [(m, ts) for m, ts, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want], abs=1e-12)


def test_processes_stopped_cleanly(plant_run):
    assert all(code == 0 for code in plant_run["codes"].values()), plant_run["codes"]
