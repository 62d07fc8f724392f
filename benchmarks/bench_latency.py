"""Latency: job end on the CNC to the job's point being queryable in InfluxDB.

A simulated plant of ``--machines`` machines runs short jobs (``--job-s`` plant seconds with
``--gap-s`` between them, job ends spread over the cycle) at ``--speed``; the agent publishes
to a private Mosquitto, an ``energy-agent bridge`` writes to InfluxDB 1.6.7 (v1 /write) and
confirms. Every job's end in real time is known exactly: the simulated CNC ends it at
``anchor + end_s / speed`` (its update task runs every 10 ms). This process queries InfluxDB
(``/query``) every ``--resolution`` s and takes, per job, the end of the first query whose
answer holds the point. Latency = that instant - the job's end; it is an upper bound, too
high by at most the polling period plus one query's duration (both printed).

The agent's own log line of each record (written after the ledger commit) splits the latency
into end -> committed (the CNC's next publish response; with the default ``settle_s`` the job's
last instant is handed over at the end of that response when the server built it more than
WRITE_SPREAD_S after the instant, else after 1.5 publishing intervals of quiet; with a number,
after that quiet period; plant time, so it shrinks with the speed-up; then a meter read the
agent starts at once) and committed -> queryable (MQTT, bridge, InfluxDB: real time). The
agent's stats file says how many instants were handed over each way.

Run: .venv/bin/python benchmarks/bench_latency.py [--jobs 200] [--speed 10] [--machines 20]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchlib as bl
from energy_agent.simulators.services import InfluxDB1, Mosquitto

RECORD_LINE = re.compile(r"job (\S+) on (\S+): [0-9.]+ kWh")


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200, help="jobs to measure (default 200)")
    p.add_argument("--machines", type=int, default=20)
    p.add_argument("--speed", type=float, default=10.0, help="plant seconds per real second (default 10)")
    p.add_argument("--job-s", type=float, default=30.0, help="job length, plant s (default 30)")
    p.add_argument("--gap-s", type=float, default=10.0, help="idle between jobs, plant s (default 10)")
    p.add_argument("--poll-s", type=float, default=1.0, help="meter poll interval, plant s (default 1)")
    p.add_argument("--cnc-interval-s", type=float, default=0.5, help="CNC publishing interval, plant s (default 0.5)")
    p.add_argument("--settle-s", type=float, default=None,
                   help="CNC settle_s, plant s (default: the agent's, 1.5 CNC intervals; 0: end of each publish)")
    p.add_argument("--resolution", type=float, default=0.05, help="InfluxDB polling period, real s (default 0.05)")
    p.add_argument("--lead", type=float, default=20.0, help="real seconds before the first job (start-up)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-latency-"))
    workdir.mkdir(parents=True, exist_ok=True)

    cycle = args.job_s + args.gap_s
    per_machine = math.ceil(args.jobs / args.machines)
    first_s = args.lead * args.speed
    duration = first_s + (per_machine + 1) * cycle + args.job_s
    plant = [bl.machine(i, i + 1, duration, job_s=args.job_s, gap_s=args.gap_s, first_s=first_s)
             for i in range(args.machines)]
    broker, influx = Mosquitto(), InfluxDB1()
    sim = agent = bridge = None
    seen: dict[tuple[str, str], float] = {}
    query_s: list[float] = []
    try:
        broker.start(workdir / "mosquitto")
        influx.start(workdir / "influxdb")
        influx.create_database("energy")
        anchor = time.time()
        sim, info, _ = bl.start_simulators(workdir, meters=args.machines, cncs=args.machines, per_port=50,
                                           duration_s=duration + 60 * args.speed, speed=args.speed, anchor=anchor,
                                           job_s=args.job_s, gap_s=args.gap_s, first_s=first_s, core=None)
        store = {"api": "v1", "url": influx.url, "database": "energy"}
        mqtt = {"host": "127.0.0.1", "port": broker.port, "confirm_by": ["influxdb"]}
        common = dict(meters=args.machines, cncs=args.machines, per_port=50, poll_s=args.poll_s,
                      cnc_interval_s=args.cnc_interval_s, speed=args.speed, anchor=anchor, mqtt=mqtt,
                      settle_s=args.settle_s)
        bdir = workdir / "bridge"
        bdir.mkdir(exist_ok=True)
        bcfg = bl.agent_config(bdir, info, **common, influx={**store, "client_id": "energy-bridge-bench",
                                                                  "confirm_as": "influxdb"})
        blog = bdir / "bridge.log"
        bridge = bl.start_agent(bcfg, blog, core=None, command="bridge")
        cfg = bl.agent_config(workdir, info, **common)
        log = workdir / "agent.log"
        stats = workdir / "stats.json"
        agent = bl.start_agent(cfg, log, core=None, stats_file=stats, stats_interval=60.0)
        bl.wait_for(lambda: bl.log_has(blog, "bridge running"), 60, "the bridge", ((bridge, blog),))
        bl.wait_for(lambda: bl.log_has(log, "all devices answering"), 60, "the agent", ((agent, log),))
        ends = {(m["id"], j["job_id"]): anchor + (j["start_s"] + args.job_s) / args.speed
                for m in plant for j in m["jobs"]}
        first_start = min(anchor + j["start_s"] / args.speed for m in plant for j in m["jobs"])
        if time.time() > first_start:
            raise RuntimeError("start-up took longer than --lead: raise it")
        # the first --jobs jobs to end
        wanted = dict(sorted(ends.items(), key=lambda kv: kv[1])[:args.jobs])
        print(f"bench_latency: {len(wanted)} jobs on {args.machines} machines at {args.speed:g}x "
              f"(jobs {args.job_s:g} s, "
              f"meter poll {args.poll_s:g} s, CNC interval {args.cnc_interval_s:g} s, settle_s "
              f"{'default' if args.settle_s is None else f'{args.settle_s:g} s'}, plant time); "
              f"the last ends in {max(wanted.values()) - time.time():.0f} s; in {workdir}", flush=True)
        deadline = max(wanted.values()) + 60
        while len(seen) < len(wanted) and time.time() < deadline:
            t_q = time.time()
            rows = influx.query("SELECT job_id, machine FROM job_energy", "energy")
            t_a = time.time()
            query_s.append(t_a - t_q)
            for r in rows:
                key = (r["machine"], r["job_id"])
                if key in wanted and key not in seen:
                    seen[key] = t_a
            for proc, plog in ((agent, log), (bridge, blog)):
                if proc.poll() is not None:
                    raise RuntimeError(f"{plog.name}: exited ({proc.returncode})")
            time.sleep(max(0.0, args.resolution - (time.time() - t_q)))
    finally:
        bl.stop(agent)
        bl.stop(bridge)
        bl.stop(sim)
        influx.stop()
        broker.stop()
    committed = {}
    for line in log.read_text(errors="replace").splitlines():
        m = RECORD_LINE.search(line)
        if m:
            committed[(m.group(2), m.group(1))] = bl.stamp_of(line)
    keys = [k for k in wanted if k in seen]
    total = np.array([seen[k] - wanted[k] for k in keys])
    to_commit = np.array([committed[k] - wanted[k] for k in keys if k in committed])
    delivery = np.array([seen[k] - committed[k] for k in keys if k in committed])
    resolution = args.resolution + pct(query_s, 99)
    print(f"{'':28} {'p50':>7} {'p99':>7} {'max':>7}")
    for name, v in (("job end -> queryable", total), ("job end -> committed (log)", to_commit),
                    ("committed -> queryable", delivery)):
        print(f"{name:28} {pct(v, 50):6.3f}s {pct(v, 99):6.3f}s {v.max() if len(v) else float('nan'):6.3f}s")
    print(f"measurement resolution: InfluxDB polled every {args.resolution:g} s, "
          f"query p99 {pct(query_s, 99) * 1000:.0f} ms: "
          f"each latency is high by at most {resolution:.3f} s; log stamps 1 ms")
    publish = args.cnc_interval_s / args.speed
    hold = 1.25 * publish + 0.05 if args.settle_s is None else args.settle_s / args.speed
    then = ("an instant that response may have split waits for the next one, or" if args.settle_s is None
            else f"settle_s {args.settle_s:g}: every instant waits")
    print(f"waits: the CNC's next publish response <= {publish:.3f} s real; then {then} <= {hold:.3f} s; "
          f"the meter is read at once at a job end")
    try:
        instants = json.loads(stats.read_text())["cnc_instants"]
        print(f"CNC instants handed over at the end of their publish response: {instants['publish']}, "
              f"after settle_s of quiet: {instants['quiet']} (the others: by the next instant)")
    except (OSError, ValueError, KeyError) as exc:
        print(f"no CNC instant counts in the agent's stats file: {exc}")
    missing = len(wanted) - len(keys)
    print()
    print(f"figure: job end -> queryable in InfluxDB over {len(keys)} jobs: p50 {pct(total, 50):.3f} s, "
          f"p99 {pct(total, 99):.3f} s (at {args.speed:g}x; goal p99 <= 1 s)")
    if missing:
        print(f"PROBLEM: {missing} jobs never appeared in InfluxDB")
    print(f"command: {bl.command_line()}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
