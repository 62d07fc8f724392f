"""Shared parts of the agent benchmarks: a simulated plant of any size, agent configs, pinned
processes and what /proc says about them.

A plant of N meters and C CNCs: machine i has meter i and, for i < C, CNC i (the agent polls
meters without a machine too, they simply feed no tracker). Meters are served by
:class:`energy_agent.simulators.meter.MeterBank` servers, ``per_port`` unit ids on each port (one Modbus
server holds at most 247 unit ids, and the agent's meters on one port share one connection
and take turns); the CNCs by one :class:`energy_agent.simulators.cnc.CncBank`. Every machine runs jobs
back to back with idle gaps, phase-shifted so that job ends are spread over time.

``python benchmarks/benchlib.py serve ...`` is the simulator process the benchmarks start:
it writes the ports it bound to a JSON file and serves until SIGTERM, then writes how many
Modbus requests it answered.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from energy_agent.simulators.services import stop_process  # noqa: E402

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
NAMESPACE = "urn:energy-agent:bench"
PROFILE = "eastron-sdm630"  # power and energy in one coalesced request per poll
POWER_W = {"ready": 1200.0, "setup": 2600.0, "processing": 9000.0, "interrupted": 1800.0}
FACTOR = {"value": 0.6592, "authority": "benchmark", "document": "benchmark factor", "region": "VN", "year": 2023,
          "method": "benchmark", "basis": "location"}


# ------------------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (s), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process' threads were runnable but waiting for a CPU (/proc/PID/task/*/schedstat):
    on a shared machine, the time other work took from it."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise ValueError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (e.g. the agent's kernel worker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rss_parts_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MB of ``pid``: file-backed pages (mapped libraries
    such as LLVM's) are shared and can be dropped and read again by the kernel."""
    anon = file = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) / 1024.0
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) / 1024.0
    return anon, file


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinned(core: int | None):
    """A preexec_fn pinning the child to one core (None: no pinning)."""
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def spawn(args: list[str], log: Path, *, core: int | None = None, cwd: Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """Start a process in its own session with output to ``log``; stop it with :func:`stop`."""
    fh = open(log, "ab")
    try:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd or ROOT, start_new_session=True, preexec_fn=pinned(core), env=env)
    finally:
        fh.close()


def stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    return None if proc is None else stop_process(proc, timeout)


def wait_for(cond, timeout: float, what: str, procs: tuple = (), step: float = 0.1):
    """Poll ``cond()`` until truthy (returned); fails when a process in ``procs`` exits or on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        for p, log in procs:
            if p.poll() is not None:
                tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{what}: process {p.pid} exited ({p.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def log_has(log: Path, text: str) -> bool:
    try:
        return text in log.read_text(errors="replace")
    except OSError:
        return False


STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


def stamp_of(line: str) -> float:
    """Epoch seconds of an agent log line (UTC, 1 ms resolution)."""
    m = STAMP.match(line)
    if not m:
        raise ValueError(f"no timestamp in {line!r}")
    return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def percentile_from_hist(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Upper edge of the bin holding the q-th percentile (a bound: the value is at most this)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(counts), q / 100.0 * total, side="left"))
    return float(edges[k + 1])


def pyspy_report(raw: Path, top: int = 20) -> str:
    """Where a process spent its samples, from ``py-spy record --format raw`` (collapsed
    stacks): own share per function (leaf frames), inclusive share per package and module."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        groups = set()
        for f in frames:
            where = f[f.rfind("(") + 1:].rstrip(")")
            for g in GROUPS:
                if g in where:
                    groups.add(g)
        for g in groups:
            incl[g] = incl.get(g, 0) + count
    if not total:
        return "py-spy recorded no samples"
    lines = [f"{total} samples; own share by function (leaf frame):"]
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * c / total:5.1f} %  {f}")
    lines.append("inclusive share (any frame on the stack in): " + ", ".join(
        f"{g} {100 * c / total:.1f} %" for g, c in sorted(incl.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


GROUPS = ("pymodbus/", "asyncua/", "asyncio/", "numpy/", "numba/", "drivers/modbus.py", "drivers/opcua.py",
          "drivers/profile.py", "app/runtime.py", "domain/tracker.py", "domain/samples.py", "domain/energy.py",
          "records/ledger.py", "records/archive.py", "bridge/bridge.py", "bridge/influx.py", "delivery/mqtt.py",
          "paho/", "urllib/", "http/", "json/", "logging/", "selectors.py")


# ------------------------------------------------------------------------------ the plant


def machine(i: int, unit_id: int, duration_s: float, *, job_s: float, gap_s: float, first_s: float) -> dict:
    """Machine i: jobs of ``job_s`` (setup 1/6, processing the rest) every ``job_s + gap_s``,
    the first at ``first_s`` plus a phase that spreads job ends over the cycle."""
    cycle = job_s + gap_s
    t = first_s + (i * 0.618034 % 1.0) * cycle
    jobs, k = [], 0
    while t + job_s <= duration_s:
        jobs.append({"job_id": f"J-{i}-{k}", "program": f"O{1000 + k % 7}", "product": "BENCH-1",
                     "serial": f"SN-{i}-{k}", "subassembly": "part", "parts": 1, "start_s": round(t, 3),
                     "phases": [["setup", job_s / 6], ["processing", job_s * 5 / 6]]})
        t += cycle
        k += 1
    return {"id": f"m{i}",
            "meter": {"unit_id": unit_id, "profile": PROFILE, "energy_offset_kwh": 1000.0 + i,
                      "ripple": {"amplitude": 0.03, "period_s": 47.0, "phase": i % 6}},
            "cnc": {"node_map": "opc40502", "channel": f"M{i}.Channel_1", "job": f"M{i}.Job"},
            "power_w": POWER_W, "idle_state": "ready", "jobs": jobs}


def scenario_dict(name: str, machines: list[dict], speed: float, duration_s: float) -> dict:
    return {"name": name, "speed": speed, "duration_s": duration_s, "namespace": NAMESPACE, "machines": machines,
            "faults": []}


def ports_of(meters: int, per_port: int) -> int:
    return -(-meters // per_port)


async def _serve(args: argparse.Namespace) -> None:
    from energy_agent.core.clock import Clock
    from energy_agent.simulators import scenario as scn
    from energy_agent.simulators.cnc import CncBank
    from energy_agent.simulators.meter import MeterBank

    # Thousands of machines share one profile and one node map: load each once, not per machine.
    scn.load_profile = functools.lru_cache(maxsize=None)(scn.load_profile)
    scn.load_nodemap = functools.lru_cache(maxsize=None)(scn.load_nodemap)
    clock = Clock(args.speed, args.anchor)
    kw = dict(job_s=args.job_s, gap_s=args.gap_s, first_s=args.first_s)
    banks = []
    for port in range(ports_of(args.meters, args.per_port)):
        ids = range(port * args.per_port, min(args.meters, (port + 1) * args.per_port))
        ms = [machine(i, i - port * args.per_port + 1, args.duration_s, **kw) for i in ids]
        banks.append(MeterBank(scn.parse(scenario_dict(f"meters-{port}", ms, args.speed, args.duration_s)), clock,
                               port=0))
    cncs = None
    if args.cncs:
        ms = [machine(i, 1 + i % 247, args.duration_s, **kw) for i in range(args.cncs)]
        cncs = CncBank(_unique_units(scn, scenario_dict("cncs", ms, args.speed, args.duration_s)), clock, port=0)
    for b in banks:
        await b.start()
    if cncs is not None:
        await cncs.start()
    # Thousands of simulated devices are a large heap: a full collection would stall every
    # server for 100+ ms every few seconds and be counted as the agent's poll lateness.
    gc.collect()
    gc.freeze()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"modbus_ports": [b.port for b in banks],
                               "opcua_endpoint": cncs.endpoint if cncs else None, "pid": os.getpid()}))
    tmp.replace(out)
    stop_ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_ev.set)
    await stop_ev.wait()
    requests = sum(b.requests for b in banks)
    if cncs is not None:
        await cncs.stop()
    for b in banks:
        await b.stop()
    out.with_name(out.name + ".requests").write_text(str(requests))


def _unique_units(scn, data: dict):
    """The CNC scenario may hold more than 247 machines: its meters are never served, so each
    gets a distinct (fictitious) unit id only to pass validation, which wants 1..247."""
    if len(data["machines"]) <= 247:
        return scn.parse(data)
    # Validate in chunks of 247 (unit ids unique within each), then join the machine models.
    parts = [scn.parse({**data, "machines": data["machines"][k:k + 247]}) for k in range(0, len(data["machines"]), 247)]
    first = parts[0]
    return first.model_copy(update={"machines": [m for p in parts for m in p.machines]})


def start_simulators(workdir: Path, *, meters: int, cncs: int, per_port: int, duration_s: float, speed: float,
                     anchor: float, job_s: float, gap_s: float, first_s: float, core: int | None,
                     timeout: float = 300.0) -> tuple[subprocess.Popen, dict, Path]:
    """Start the simulator process; returns it, its ports and its log."""
    out = workdir / "simulators.json"
    log = workdir / "simulators.log"
    out.unlink(missing_ok=True)
    proc = spawn([PY, str(Path(__file__)), "serve", "--meters", str(meters), "--cncs", str(cncs),
                  "--per-port", str(per_port), "--duration-s", str(duration_s), "--speed", str(speed),
                  "--anchor", repr(anchor), "--job-s", str(job_s), "--gap-s", str(gap_s), "--first-s", str(first_s),
                  "--out", str(out)], log, core=core)
    try:
        wait_for(out.exists, timeout, "the simulators", ((proc, log),), step=0.2)
    except BaseException:
        stop(proc)
        raise
    return proc, json.loads(out.read_text()), log


def agent_config(workdir: Path, sim: dict, *, meters: int, cncs: int, per_port: int, poll_s: float = 1.0,
                 cnc_interval_s: float = 0.5, speed: float = 1.0, anchor: float | None = None,
                 mqtt: dict | None = None, influx: dict | None = None, archive: bool = True,
                 extra: dict | None = None, settle_s: float | None = None) -> Path:
    """Write the agent's config for the first ``meters`` meters and ``cncs`` CNCs of the plant."""
    cfg: dict = {"site": "bench", "agent_id": "gw", "log_level": "INFO",
                 "ledger": {"path": str(workdir / "ledger.db")},
                 "archive": {"enabled": archive},
                 "emission_factors": {"f": FACTOR},
                 "meters": [{"id": f"pm-{i}", "host": "127.0.0.1", "port": sim["modbus_ports"][i // per_port],
                             "unit_id": i % per_port + 1, "profile": PROFILE, "poll_interval_s": poll_s,
                             "timeout_s": 1.0} for i in range(meters)],
                 "cncs": [{"id": f"cnc-{i}", "endpoint": sim["opcua_endpoint"], "interval_s": cnc_interval_s,
                           **({} if settle_s is None else {"settle_s": settle_s}),
                           "params": {"namespace": NAMESPACE, "channel": f"M{i}.Channel_1", "job": f"M{i}.Job"}}
                          for i in range(cncs)],
                 "machines": [{"id": f"m{i}", "meter": f"pm-{i}", "cnc": f"cnc-{i}", "emission_factor": "f"}
                              for i in range(cncs)]}
    if speed != 1.0:
        cfg["clock"] = {"speed": speed, "anchor": datetime.fromtimestamp(anchor, timezone.utc).isoformat()}
    if mqtt is not None:
        cfg["mqtt"] = mqtt
    if influx is not None:
        cfg["influx"] = influx
    for k, v in (extra or {}).items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_agent(config: Path, log: Path, *, core: int | None, stats_interval: float | None = None,
                stats_file: Path | None = None, command: str = "run") -> subprocess.Popen:
    args = [PY, "-m", "energy_agent", "--log-level", "INFO", command, "-c", str(config)]
    if stats_interval:
        args += ["--stats-interval", str(stats_interval)]
    if stats_file is not None:
        args += ["--stats-file", str(stats_file)]
    return spawn(args, log, core=core)


def command_line() -> str:
    """How this benchmark was run, to print beside its figures."""
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    rel = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(filter(None, [env, ".venv/bin/python", rel, *sys.argv[1:]]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchlib", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a benchmark plant's meters and CNCs")
    s.add_argument("--meters", type=int, required=True)
    s.add_argument("--cncs", type=int, default=0)
    s.add_argument("--per-port", type=int, default=50)
    s.add_argument("--duration-s", type=float, required=True)
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--anchor", type=float, required=True)
    s.add_argument("--job-s", type=float, default=60.0)
    s.add_argument("--gap-s", type=float, default=20.0)
    s.add_argument("--first-s", type=float, default=10.0)
    s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not 1 <= args.per_port <= 247:
        p.error("--per-port: a Modbus server has unit ids 1..247")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
