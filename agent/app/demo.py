"""``energy-agent demo``: a simulated plant end to end, the per-job table read back from InfluxDB.

Starts a private Mosquitto and InfluxDB 1.x on free loopback ports, the simulators, the agent
and the bridge as separate processes (:class:`energy_agent.simulators.plant.PlantRun`), waits for the
scenario, reads every job's point back from InfluxDB, prints it beside the simulator's
closed-form truth and stops everything it started. Exit 0 only when every job landed once and
within tolerance and the ledger's hash chains verify.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from energy_agent.app.cli.common import print_table
from energy_agent.drivers.profile import load_profile
from energy_agent.records.ledger import Ledger
from energy_agent.records.record import verify_chain
from energy_agent.simulators.plant import DEMO_SCENARIO, PlantRun
from energy_agent.simulators.services import InfluxDB1, Mosquitto

STATE_ABBR = {"setup": "setup", "processing": "proc", "interrupted": "intr", "ready": "ready", "standby": "stby", "off": "off"}


def tolerance_kwh(profile_name: str, counter_kwh: float, truth_kwh: float) -> float:
    """max(0.1 % of the truth, 2 steps of the counter register at its value)."""
    step = load_profile(profile_name).counter_step_kwh() or float(np.spacing(np.float32(counter_kwh)))
    return max(1e-3 * truth_kwh, 2 * step)


def _iso(ns: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ns / 1e9)) + f".{int(ns % 1_000_000_000) // 1_000_000:03d}"


def build_rows(points: list[dict], truth: list[dict], profiles: dict[str, str]) -> tuple[list[dict], list[str]]:
    """Join InfluxDB points with the truth; returns table rows and the problems found."""
    problems: list[str] = []
    by_job: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        by_job.setdefault((p["machine"], p["job_id"]), []).append(p)
    rows = []
    for t in truth:
        found = by_job.pop((t["machine"], t["job_id"]), [])
        if len(found) != 1:
            problems.append(f"{t['machine']} {t['job_id']}: {len(found)} points in InfluxDB (expected 1)")
            if not found:
                continue
        p = found[0]
        err = p["kwh"] - t["kwh"]
        tol = tolerance_kwh(profiles[t["machine"]], t["counter_end_kwh"], t["kwh"])
        if abs(err) > tol:
            problems.append(f"{t['machine']} {t['job_id']}: error {err * 1000:+.3f} Wh beyond {tol * 1000:.3f} Wh")
        states = " ".join(f"{STATE_ABBR[s]} {p['kwh_' + s]:.3f}" for s in STATE_ABBR if p.get("kwh_" + s, 0) > 0)
        rows.append({
            "machine": t["machine"], "job": t["job_id"], "program": p.get("program", ""),
            "start (UTC)": _iso(p["time"]), "end": _iso(p["end_ns"]),
            "kWh": f"{p['kwh']:.4f}", "by state (kWh)": states, "kgCO2e": f"{p['kgco2e']:.4f}",
            "true kWh": f"{t['kwh']:.4f}", "error Wh": f"{err * 1000:+.3f}",
            "error %": f"{100 * err / t['kwh']:+.4f}", "tol Wh": f"{tol * 1000:.3f}",
            "quality": f"{p['method']} cov {p['coverage']:.3f} gaps {p['gap_count']}",
        })
    for (machine, job_id), extra in by_job.items():
        problems.append(f"{machine} {job_id}: {len(extra)} points without a job in the scenario")
    return rows, problems


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="energy-demo-"))
    scenario = Path(args.scenario) if args.scenario else DEMO_SCENARIO
    t_start = time.monotonic()
    print(f"demo: working in {workdir}")
    print("demo: compiling / loading the energy kernels ...", flush=True)
    from energy_agent.domain import energy

    energy.warm_up()  # fills numba's cache, which the agent process then loads from
    broker, influx = Mosquitto(), InfluxDB1()
    try:
        broker.start(workdir / "mosquitto")
        influx.start(workdir / "influxdb")
        influx.create_database("energy")
        print(f"demo: Mosquitto on 127.0.0.1:{broker.port}, InfluxDB 1.x on {influx.url}", flush=True)
        store = {"api": "v1", "url": influx.url, "database": "energy"}
        with PlantRun(workdir / "plant", broker.port, {"influxdb": store}, scenario_path=scenario) as run:
            truth = run.truth()
            run.start()
            print(f"demo: simulators, agent and bridge running; scenario of {len(truth)} jobs on "
                  f"{len({t['machine'] for t in truth})} machines at {run.speed:g}x, "
                  f"~{max(0.0, run.end_wall - time.time()):.0f} s", flush=True)
            points = run.wait_until(
                lambda: (r := influx.query("SELECT * FROM job_energy", "energy")) and len(r) >= len(truth) and r,
                max(30.0, run.end_wall - time.time() + 60.0), f"{len(truth)} job points in InfluxDB")
            codes = run.stop()
            ledger = Ledger(run.workdir / "ledger.db")
            try:
                records = ledger.records()
            finally:
                ledger.close_sync()
        rows, problems = build_rows(points, truth, run.profiles())
        print()
        print_table(rows, list(rows[0]) if rows else ["machine"])
        print()
        chain = verify_chain(records)
        problems += chain
        problems += [f"{name} exited with {code}" for name, code in codes.items() if code not in (0, None)]
        errs = [abs(float(r["error %"])) for r in rows]
        print(f"demo: {len(rows)} jobs read back from InfluxDB; |error| max {max(errs, default=0):.4f} %, "
              f"mean {np.mean(errs) if errs else 0:.4f} %; ledger: {len(records)} records, "
              f"hash chains {'intact' if not chain else 'BROKEN'}; {time.monotonic() - t_start:.0f} s")
        for p in problems:
            print(f"demo: PROBLEM: {p}")
        return 0 if not problems else 1
    finally:
        influx.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(scenario=None, workdir=None)))
