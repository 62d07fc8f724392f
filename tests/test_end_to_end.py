"""End to end with real processes: simulators → agent → Mosquitto → bridges → InfluxDB 1.6.7 and
VictoriaMetrics (v2 write path), compared with the simulators' closed-form truth.

One run of the demo scenario (two machines, back-to-back jobs, an interrupted phase; an Eastron
SDM630 float32 kWh counter and a Schneider iEM3000 int64 Wh counter) feeds two bridges at once:
one writes InfluxDB 1.6.7 through v1 ``/write``, the other VictoriaMetrics through the
influxdb-client v2 API. Every job must land exactly once in each, with the ledger's values,
within max(0.1 %, 2 counter steps) of the truth; the idle intervals between jobs too, and the
records of each machine tile its time.
"""

from __future__ import annotations

import time

import pytest

from energy_agent.app.demo import tolerance_kwh
from energy_agent.bridge.lineproto import time_ns
from energy_agent.core.record import parse_record
from energy_agent.records.ledger import Ledger
from energy_agent.records.record import verify_chain
from energy_agent.simulators import scenario as scn
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
            return recs if sum("job" in r for r in recs) >= len(truth) else None

        timeout = run.end_wall - time.time() + 60
        records = run.wait_until(ledger_complete, timeout, f"{len(truth)} records in the ledger")
        rows_v1 = run.wait_until(
            lambda: (r := influxdb.query("SELECT * FROM job_energy", "energy")) and len(r) >= len(truth) and r,
            30, "all points in InfluxDB 1.6.7")
        n_intervals = sum("interval" in r for r in records)
        rows_iv = run.wait_until(
            lambda: (r := influxdb.query("SELECT * FROM machine_energy", "energy")) and len(r) >= n_intervals and r,
            30, "all interval points in InfluxDB 1.6.7")

        def vm_rows():
            victoria.force_flush()
            series = victoria.export('{__name__=~"job_energy_kwh"}')
            return series if sum(len(s["values"]) for s in series) >= len(truth) else None

        vm_series = run.wait_until(vm_rows, 30, "all points in VictoriaMetrics")
        codes = run.stop()
    return {"truth": truth, "records": records, "v1": rows_v1, "intervals_v1": rows_iv, "vm": vm_series,
            "codes": codes, "run": run}


def jobs_of(plant_run) -> list[dict]:
    return [r for r in plant_run["records"] if "job" in r]


def test_every_job_recorded_once_within_tolerance(plant_run):
    truth, records = plant_run["truth"], jobs_of(plant_run)
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
        assert r["boundaries"] == {"start": {"basis": "observed", "reason": None},
                                   "end": {"basis": "observed", "reason": None}}
        assert r["job"]["program"] == t["program"] and r["job"]["serials"] == [t["serial"]]
        assert r["job"]["product"] == t["product"] and r["job"]["subassembly"] == t["subassembly"]
        assert r["job"]["parts"] == t["parts"]
    assert verify_chain([parse_record(r) for r in plant_run["records"]]) == []


def test_the_time_between_jobs_is_recorded_and_the_records_tile_each_machine(plant_run):
    """Idle intervals carry the machine's energy between jobs within the same tolerance as jobs
    (closed form over the interval); a machine's records share their boundaries, so none of its
    time is missing or counted twice."""
    run, records = plant_run["run"], plant_run["records"]
    scenario = scn.load(run.scenario_path)
    profiles = run.profiles()
    intervals = [r for r in records if "interval" in r]
    assert intervals and all(r["interval"]["kind"] == "idle" for r in intervals)
    for r in intervals:
        tl = scenario.machine(r["machine"]).timeline
        a, b = (time_ns(r[k], k) / 1e9 - run.anchor for k in ("start", "end"))
        true_kwh = sum(tl.energy_ws(a, b).values()) / 3.6e6
        tol = tolerance_kwh(profiles[r["machine"]], tl.energy_at(b), true_kwh)
        assert abs(r["energy"]["kwh"] - true_kwh) <= tol, (r["machine"], r["start"], r["energy"]["kwh"], true_kwh)
        assert r["interval"]["parts"] == 0
    for machine in {r["machine"] for r in records}:
        mine = sorted((r for r in records if r["machine"] == machine), key=lambda r: r["seq"])
        spans = sorted((r["start"], r["end"]) for r in mine)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans


def test_influxdb_v1_has_each_record_once_with_ledger_values(plant_run):
    records = {r["record_id"]: r for r in jobs_of(plant_run)}
    rows = plant_run["v1"]
    assert sorted(row["record_id"] for row in rows) == sorted(records)
    for row in rows:
        rec = records[row["record_id"]]
        assert row["kwh"] == pytest.approx(rec["energy"]["kwh"], abs=1e-12)
        assert row["kgco2e"] == pytest.approx(rec["emissions"]["kgco2e"], abs=1e-12)
        assert row["machine"] == rec["machine"] and row["serial"] == rec["job"]["serials"][0]
        assert row["hash"] == rec["hash"]
    intervals = {r["record_id"]: r for r in plant_run["records"] if "interval" in r}
    assert sorted(row["record_id"] for row in plant_run["intervals_v1"]) == sorted(intervals)
    for row in plant_run["intervals_v1"]:
        assert row["kwh"] == pytest.approx(intervals[row["record_id"]]["energy"]["kwh"], abs=1e-12)
        assert row["kind"] == "idle"


def test_victoriametrics_v2_path_has_each_record_once(plant_run):
    # VictoriaMetrics turns field kwh into the series job_energy_kwh (one per tag set) and keeps
    # millisecond timestamps: one sample per record, at the job start, with the ledger's kWh.
    got = sorted((s["metric"]["machine"], ts, v) for s in plant_run["vm"]
                 for ts, v in zip(s["timestamps"], s["values"]))
    want = sorted((r["machine"], time_ns(r["start"], "start") // 1_000_000, r["energy"]["kwh"])
                  for r in jobs_of(plant_run))
    assert [(m, ts) for m, ts, _ in got] == [(m, ts) for m, ts, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want], abs=1e-12)


def test_processes_stopped_cleanly(plant_run):
    assert all(code == 0 for code in plant_run["codes"].values()), plant_run["codes"]
