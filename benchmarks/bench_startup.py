"""Start-up: from process start to the first meter poll, with the kernel cache filled.

The kernel cache is filled first (``energy.warm_up()`` in this process), then the agent is
started ``--runs`` times against simulated meters and CNCs (a fresh ledger each time). Each
run is timed from just before the process is spawned to the log line "first meter poll done"
(log timestamps, 1 ms resolution), with the marks on the way: "kernels loaded" (the kernel
worker process loaded them from numba's cache; the agent does not wait for it), "running"
(ledger open, tasks started).

The last run also checks that no kernel is compiled, or loaded from the cache, once polling
has begun (numba's ``NUMBA_DEBUG_CACHE`` lines in the output of the agent and its worker, against the
"kernels loaded" line), and it waits for a job record so that the job kernel has run: a
compilation then would happen on the event loop and stall every device task.

Run: .venv/bin/python benchmarks/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl

MARKS = {"kernels": "kernels loaded in a worker process", "running": "agent bench/gw running", "first_poll": "first meter poll done"}


def marks(log: Path) -> dict[str, float]:
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        for k, text in MARKS.items():
            if k not in out and text in line:
                out[k] = bl.stamp_of(line)
    return out


def cache_events_after_ready(log: Path) -> list[str]:
    """numba cache lines (a kernel loaded or compiled and saved) printed after 'kernels loaded'."""
    lines = log.read_text(errors="replace").splitlines()
    ready = next((i for i, line in enumerate(lines) if MARKS["kernels"] in line), None)
    if ready is None:
        return ["no 'kernels loaded' line"]
    return [line for line in lines[ready:] if line.startswith("[cache]")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--meters", type=int, default=2)
    p.add_argument("--cncs", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from energy_agent.domain import energy

    t = time.monotonic()
    energy.warm_up()  # fills the cache the agent loads from
    print(f"bench_startup: kernel cache filled ({time.monotonic() - t:.2f} s in this process); "
          f"{args.runs} runs, {args.meters} meters, {args.cncs} CNCs; in {workdir}", flush=True)
    speed = 30.0
    anchor = time.time()
    sim, info, _ = bl.start_simulators(workdir, meters=args.meters, cncs=args.cncs, per_port=50, speed=speed,
                                       anchor=anchor, duration_s=speed * (60 + 30 * args.runs), job_s=60.0,
                                       gap_s=15.0, first_s=0.0, core=None)
    rows, problems = [], []
    try:
        for k in range(args.runs):
            d = workdir / f"run-{k}"
            d.mkdir(exist_ok=True)
            cfg = bl.agent_config(d, info, meters=args.meters, cncs=args.cncs, per_port=50, poll_s=1.0,
                                  cnc_interval_s=1.0, speed=speed, anchor=anchor)
            log = d / "agent.log"
            last = k == args.runs - 1
            env = {**os.environ, "NUMBA_DEBUG_CACHE": "1", "PYTHONUNBUFFERED": "1"} if last else None
            t0 = time.time()
            agent = bl.spawn([bl.PY, "-m", "energy_agent", "--log-level", "INFO", "run", "-c", str(cfg)], log, env=env)
            try:
                bl.wait_for(lambda: bl.log_has(log, MARKS["first_poll"]), 60, "the first poll", ((agent, log),),
                            step=0.02)
                bl.wait_for(lambda: bl.log_has(log, MARKS["kernels"]), 60, "the kernels loaded", ((agent, log),))
                if last:
                    bl.wait_for(lambda: bl.log_has(log, "kWh ("), 60, "a job record", ((agent, log),))
            finally:
                bl.stop(agent)
            m = marks(log)
            row = {k2: v - t0 for k2, v in m.items()}
            rows.append(row)
            print(f"run {k + 1}: kernels loaded {row['kernels']:.3f} s, running {row['running']:.3f} s, "
                  f"first poll {row['first_poll']:.3f} s after spawn", flush=True)
            if last:
                late = cache_events_after_ready(log)
                if late:
                    problems.append(f"{len(late)} kernel cache events after 'kernels loaded' (a kernel compiled or "
                                    f"loaded while polling): {late[:3]}")
                else:
                    print("   no kernel compiled or loaded after 'kernels loaded' (a job record was made)")
    finally:
        bl.stop(sim)
    first = [r["first_poll"] for r in rows]
    print()
    print(f"figure: process start to first poll: median {statistics.median(first):.2f} s, max {max(first):.2f} s over "
          f"{len(first)} runs (kernels loaded by the worker, in parallel: median "
          f"{statistics.median(r['kernels'] for r in rows):.2f} s); "
          "goal <= 2 s")
    for p_ in problems:
        print(f"PROBLEM: {p_}")
    print(f"command: {bl.command_line()}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
