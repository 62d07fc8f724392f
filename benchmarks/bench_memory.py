"""Memory: the agent's RSS with ``--meters`` meters over ``--plant-hours`` of simulated time.

The plant runs on a scaled clock (config ``clock: speed``, shared with the simulators): at
``--speed`` 30 an hour of plant time takes two real minutes. Meters are polled every
``--poll-s`` plant seconds (default 30: once per real second at 30x, so the agent does as many
Modbus exchanges per real second as a 1 Hz plant of the same size); ``--machines`` of them
have a CNC and a job tracker, whose jobs (``--job-s`` long) become records, archive frames
and ledger rows during the run. RSS (VmRSS, /proc/PID/status) is sampled every
``--sample-s`` real seconds from the moment every device answers.

Printed: RSS at the start, peak and end, and the slope of a least-squares line through the
second half of the samples (MB per plant hour; "no growth" means a slope near zero there).

Run: .venv/bin/python benchmarks/bench_memory.py [--meters 1000] [--plant-hours 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchlib as bl


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=1000)
    p.add_argument("--machines", type=int, default=100, help="meters with a CNC and a job tracker (default 100)")
    p.add_argument("--plant-hours", type=float, default=1.0)
    p.add_argument("--speed", type=float, default=30.0)
    p.add_argument("--poll-s", type=float, default=30.0, help="meter poll interval, plant s (default 30)")
    p.add_argument("--cnc-interval-s", type=float, default=15.0, help="CNC publishing interval, plant s")
    p.add_argument("--job-s", type=float, default=600.0, help="job length, plant s (default 600)")
    p.add_argument("--gap-s", type=float, default=180.0)
    p.add_argument("--per-port", type=int, default=50)
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = bl.cores()
    agent_core, sim_core = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    lead_s = 60.0  # real seconds for start-up before the plant's first job
    plant_s = args.plant_hours * 3600.0
    anchor = time.time()
    first_s = lead_s * args.speed
    sim, info, _ = bl.start_simulators(workdir, meters=args.meters, cncs=args.machines, per_port=args.per_port,
                                       duration_s=first_s + plant_s + 600 * args.speed, speed=args.speed,
                                       anchor=anchor, job_s=args.job_s, gap_s=args.gap_s, first_s=first_s,
                                       core=sim_core)
    agent = None
    samples: list[tuple[float, float]] = []
    try:
        cfg = bl.agent_config(workdir, info, meters=args.meters, cncs=args.machines, per_port=args.per_port,
                              poll_s=args.poll_s, cnc_interval_s=args.cnc_interval_s, speed=args.speed,
                              anchor=anchor)
        log, stats = workdir / "agent.log", workdir / "stats.json"
        agent = bl.start_agent(cfg, log, core=agent_core, stats_interval=10.0, stats_file=stats)
        ready = "all devices answering" if args.machines else "running"
        bl.wait_for(lambda: bl.log_has(log, ready), 240, "every device answering", ((agent, log),), step=0.2)
        t0 = time.monotonic()
        t_end = t0 + plant_s / args.speed
        print(f"bench_memory: {args.meters} meters ({args.machines} with CNC and jobs), {args.plant_hours:g} plant h "
              f"at {args.speed:g}x = {plant_s / args.speed:.0f} s real, poll every {args.poll_s:g} plant s "
              f"({args.meters * args.speed / args.poll_s:.0f} polls/s real); in {workdir}", flush=True)
        while time.monotonic() < t_end:
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited ({agent.returncode})")
            samples.append(((time.monotonic() - t0) * args.speed / 3600.0, bl.rss_mb(agent.pid)))
            time.sleep(args.sample_s)
        samples.append(((time.monotonic() - t0) * args.speed / 3600.0, bl.rss_mb(agent.pid)))
        workers = [(c, bl.rss_mb(c), *bl.rss_parts_mb(c)) for c in bl.children(agent.pid)]
    finally:
        bl.stop(agent, 60.0)
        bl.stop(sim, 60.0)
    import json

    st = json.loads(stats.read_text()) if stats.exists() else {}
    h = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples])
    half = h >= h[-1] / 2
    slope = float(np.polyfit(h[half], mb[half], 1)[0]) if half.sum() > 2 else float("nan")
    slope_all = float(np.polyfit(h, mb, 1)[0]) if len(h) > 2 else float("nan")
    print(f"{len(samples)} samples; polls {st.get('polls', '?')}, errors {st.get('poll_errors', '?')}, "
          f"records {st.get('records', '?')}")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        k = min(len(mb) - 1, int(frac * (len(mb) - 1)))
        print(f"  plant {h[k] * 60:5.1f} min: {mb[k]:6.1f} MB")
    print()
    print(f"figure: RSS start {mb[0]:.1f} MB, peak {mb.max():.1f} MB, end {mb[-1]:.1f} MB; slope over the second half "
          f"{slope:+.1f} MB per plant hour (whole run {slope_all:+.1f}); goal <= 150 MB and no growth")
    for pid, rss, anon, file in workers:
        print(f"kernel worker (pid {pid}, numba and LLVM): RSS {rss:.1f} MB ({anon:.1f} MB anonymous, {file:.1f} MB "
              "file-backed: mapped libraries, shared and evictable)")
    print(f"command: {bl.command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
