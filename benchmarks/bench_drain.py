"""Outbox drain: records per second from a full ledger to a real broker, and on into InfluxDB.

A ledger is filled with ``--records`` unsent records (built by ``energy_agent.records.record.build`` and
appended through the ledger's own append path, hash chains and all, over ``--machines``
machines; the fill is not timed and runs without fsync). Then:

1. broker: the agent's :class:`energy_agent.delivery.outbox.Publisher` drains it to a private Mosquitto
   (QoS 1, a row is marked sent on PUBACK) until the outbox is empty: records/s;
2. end to end: a fresh copy of the same ledger is drained again with ``confirm_by`` set while
   an ``energy-agent bridge`` process writes every record to InfluxDB 1.6.7 (v1 /write) and
   confirms it; the rate is records until the last point is queryable in InfluxDB (``SELECT
   count``, polled every POLL_S once the outbox is empty), and until the ledger holds every
   confirmation. The CPU time each process used meanwhile (and how long it waited for a CPU)
   is printed beside it: the rates depend on what else the machine runs, the CPU per record
   much less.

The publisher runs in this process (as in the agent: one event loop, the ledger on its own
thread); ``--profile`` runs phase 1 again with the publisher's steps timed (read the outbox,
publish a batch and await its PUBACKs, mark it sent: they run one after the other), then under
cProfile, and prints the top costs of the event-loop thread.

Run: .venv/bin/python benchmarks/bench_drain.py [--records 10000] [--machines 20]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl
from energy_agent.delivery.config import MqttConfig
from energy_agent.delivery.mqtt import MqttClient
from energy_agent.delivery.outbox import Publisher
from energy_agent.records.ledger import Ledger
from energy_agent.simulators.services import InfluxDB1, Mosquitto
from tests import factories

SITE, AGENT, PREFIX = "bench", "gw", "energy/v1"
FLOOR = 1000
"""records/s end to end the drain must reach (issue 19): a week-long outage of a 200-machine
plant (~200,000 records) then drains in under 3.5 minutes."""
POLL_S = 0.05
"""How often phase 2 asks InfluxDB and the ledger whether everything landed (only once the
outbox is empty: nothing can be complete before that)."""


def fill(path: Path, records: int, machines: int) -> float:
    """Append ``records`` records round robin over the machines; returns seconds taken."""
    ledger = Ledger(path)
    t0 = time.monotonic()
    try:
        db = ledger._conn()
        db.execute("PRAGMA synchronous=OFF")  # setup only: the drain below runs with the ledger's own settings
        for i in range(records):
            m = f"m{i % machines}"
            ledger._append(m, lambda seq, prev, i=i, m=m: factories.build(
                seq, prev, site=SITE, agent=AGENT, machine=m, key=f"J-{i}", start_wall=factories.T0 + 600.0 * i,
                kwh=0.5 + (i % 97) / 10))
    finally:
        ledger.close_sync()
    return time.monotonic() - t0


def usage(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Per process: CPU seconds used so far, and seconds it was runnable but waited for a CPU
    (on a shared machine, what other work took from it). ``<name> loop``: the process' main
    thread alone (the bridge's event loop; the rest is paho's network thread and HTTP writes)."""
    out = {}
    for name, pid in pids.items():
        out[name] = (bl.cpu_seconds(pid), bl.runqueue_wait_s(pid))
        if name == "bridge":
            out[f"{name} loop"] = (thread_cpu_seconds(pid, pid), 0.0)
    return out


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread (s), from /proc/PID/task/TID/stat."""
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / bl.CLK_TCK


def timed(obj, name: str, spent: dict[str, list[float]]) -> None:
    """Wrap the coroutine method ``obj.name`` to add each call's duration to ``spent[name]``."""
    inner = getattr(obj, name)
    spent[name] = []

    async def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return await inner(*a, **kw)
        finally:
            spent[name].append(time.perf_counter() - t)
    setattr(obj, name, wrapper)


async def drain(path: Path, port: int, *, max_inflight: int, confirm_by: frozenset[str] = frozenset(),
                until=None, timeout: float = 600.0, spent: dict | None = None) -> dict:
    """Drain the ledger at ``path``; returns seconds until the outbox was empty and, with
    ``until`` (an async predicate), until it held. With ``spent``, the time of each step of
    the publisher's loop (read the outbox, publish a batch and await its PUBACKs, mark it sent)."""
    ledger = Ledger(path)
    await ledger.open()
    n = await ledger.pending()
    client = MqttClient(host="127.0.0.1", port=port, client_id="energy-agent-bench", max_inflight=max_inflight)
    if spent is not None:
        timed(ledger, "outbox_due", spent)
        timed(ledger, "mark_sent", spent)
        timed(client, "publish_many", spent)
    stop = asyncio.Event()
    pub = Publisher(ledger, client, topic_prefix=PREFIX, max_inflight=max_inflight, confirm_by=confirm_by,
                    confirm_topic=f"{PREFIX}/{SITE}/{AGENT}/confirm" if confirm_by else None)
    task = None
    out = {"records": n}
    try:
        await client.connect(10)
        t0 = out["t0"] = time.monotonic()
        task = asyncio.create_task(pub.run(stop))
        deadline = t0 + timeout
        # pub.sent counts rows marked sent: watching it keeps this loop off the ledger's thread
        while pub.sent < n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        out["outbox_empty_s"] = time.monotonic() - t0
        if await ledger.pending():
            raise RuntimeError(f"{path.name}: {await ledger.pending()} records still unsent")
        if until is not None:
            while not await until(ledger) and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            out["until_s"] = time.monotonic() - t0
        out["sent"] = pub.sent
    finally:
        stop.set()
        if task is not None:
            await task
        await client.close()
        await ledger.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=10000)
    p.add_argument("--machines", type=int, default=20)
    p.add_argument("--max-inflight", type=int, default=MqttConfig.model_fields["max_inflight"].default,
                   help="mqtt.max_inflight (default: the config's default)")
    p.add_argument("--skip-influx", action="store_true", help="phase 1 only")
    p.add_argument("--profile", action="store_true",
                   help="phase 1 again with the publisher's steps timed, then under cProfile; print the top costs")
    p.add_argument("--py-spy", default=None, metavar="BIN",
                   help="sample the bridge with this py-spy binary during phase 2; print where it spends time")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-drain-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("mosquitto", "influxdb"):  # a reused --workdir: no sessions or points from the last run
        shutil.rmtree(workdir / stale, ignore_errors=True)
    master = workdir / "full.db"
    master.unlink(missing_ok=True)
    fill_s = fill(master, args.records, args.machines)
    print(f"bench_drain: {args.records} unsent records over {args.machines} machines "
          f"({master.stat().st_size / 1e6:.1f} MB ledger, filled in {fill_s:.1f} s); in {workdir}", flush=True)

    def copy(name: str) -> Path:
        dst = workdir / name
        for suffix in ("", "-wal", "-shm"):
            Path(str(dst) + suffix).unlink(missing_ok=True)
        shutil.copy(master, dst)
        return dst

    broker = Mosquitto()
    influx = InfluxDB1() if not args.skip_influx else None
    bridge = None
    results = {}
    try:
        broker.start(workdir / "mosquitto")
        r = asyncio.run(drain(copy("phase1.db"), broker.port, max_inflight=args.max_inflight))
        results["broker"] = r
        rate1 = r["records"] / r["outbox_empty_s"]
        print(f"1. to the broker: {r['records']} records in {r['outbox_empty_s']:.2f} s = {rate1:.0f} records/s "
              f"(outbox empty; every record PUBACKed)", flush=True)
        if influx is not None:
            influx.start(workdir / "influxdb")
            influx.create_database("energy")
            store = {"api": "v1", "url": influx.url, "database": "energy", "client_id": "energy-bridge-bench",
                     "confirm_as": "influxdb"}
            cfg = bl.agent_config(workdir, {"modbus_ports": [], "opcua_endpoint": None}, meters=0, cncs=0,
                                  per_port=1, mqtt={"host": "127.0.0.1", "port": broker.port}, influx=store)
            log = workdir / "bridge.log"
            log.unlink(missing_ok=True)  # "bridge running" must come from this run's bridge
            bridge = bl.start_agent(cfg, log, core=None, command="bridge")
            bl.wait_for(lambda: bl.log_has(log, "bridge running"), 60, "the bridge", ((bridge, log),))

            def count() -> int:
                rows = influx.query("SELECT count(kwh) FROM job_energy", "energy")
                return int(rows[0]["count"]) if rows else 0

            seen: dict[str, float] = {}
            spy = None
            if args.py_spy:  # where the bridge spends its time while it lands the records
                spy = bl.spawn([args.py_spy, "record", "--pid", str(bridge.pid), "--format", "raw", "--nonblocking",
                                "--rate", "200", "--duration", "8", "-o", str(workdir / "bridge-pyspy.txt")],
                               workdir / "bridge-pyspy.log")

            async def landed(ledger) -> bool:
                if "influx" not in seen and count() >= args.records:
                    seen["influx"] = time.monotonic()
                rows = await ledger._run(ledger._query, "SELECT count(*) FROM records WHERE confirmed_at IS NULL", ())
                if rows[0][0] == 0 and "confirmed" not in seen:
                    seen["confirmed"] = time.monotonic()
                return len(seen) == 2

            procs = {"bridge": bridge.pid, "mosquitto": broker.pid, "influxd": influx.pid, "publisher": os.getpid()}
            before = usage(procs)
            r2 = asyncio.run(drain(copy("phase2.db"), broker.port, max_inflight=args.max_inflight,
                                   confirm_by=frozenset({"influxdb"}), until=landed))
            spent2 = {k: (v[0] - before[k][0], v[1] - before[k][1]) for k, v in usage(procs).items()}
            results["influx"] = r2
            if spy is not None:
                spy.wait(60)
            t0 = r2["t0"]
            t_influx, t_conf = seen.get("influx", float("nan")) - t0, seen.get("confirmed", float("nan")) - t0
            print(f"2. end to end: outbox empty after {r2['outbox_empty_s']:.2f} s; all {args.records} points in "
                  f"InfluxDB after {t_influx:.2f} s = {args.records / t_influx:.0f} records/s; every record confirmed "
                  f"after {t_conf:.2f} s = {args.records / t_conf:.0f} records/s (resolution {POLL_S:g} s)", flush=True)
            print("   CPU in phase 2, s (µs per record): " + ", ".join(
                f"{k} {cpu:.2f} ({1e6 * cpu / args.records:.0f})" for k, (cpu, _) in spent2.items())
                + "; waiting for a CPU, s: " + ", ".join(f"{k} {w:.2f}" for k, (_, w) in spent2.items()
                                                       if " " not in k), flush=True)
            if count() != args.records:
                print(f"   PROBLEM: InfluxDB holds {count()} points, expected {args.records}")
        if args.profile:
            spent: dict[str, list[float]] = {}
            r3 = asyncio.run(drain(copy("timed.db"), broker.port, max_inflight=args.max_inflight, spent=spent))
            total = r3["outbox_empty_s"]
            print(f"\nphase 1 again with its steps timed ({r3['records'] / total:.0f} records/s): of {total:.2f} s,")
            for name, ts in spent.items():
                print(f"  {name:13} {len(ts):4d} calls, {sum(ts):6.2f} s ({100 * sum(ts) / total:4.1f} %), "
                      f"{1000 * sum(ts) / max(1, len(ts)):6.1f} ms per call")
            prof = cProfile.Profile()
            path = copy("profiled.db")
            prof.enable()
            r3 = asyncio.run(drain(path, broker.port, max_inflight=args.max_inflight))
            prof.disable()
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.sort_stats("tottime").print_stats(20)
            print(f"\nprofile of phase 1 again ({r3['records'] / r3['outbox_empty_s']:.0f} records/s under cProfile), "
                  "event-loop thread, by own time:")
            print("\n".join(buf.getvalue().splitlines()[:45]))
    finally:
        bl.stop(bridge)
        if influx is not None:
            influx.stop()
        broker.stop()
    if args.py_spy and (workdir / "bridge-pyspy.txt").exists():
        print("\nwhere the bridge spends its time in phase 2 (py-spy):")
        print(bl.pyspy_report(workdir / "bridge-pyspy.txt", 15))
    print()
    line = f"figure: broker drain {rate1:.0f} records/s"
    if "influx" in results:
        rate2 = args.records / t_influx
        line += f", end to end into InfluxDB {rate2:.0f} records/s ({rate2 / rate1:.2f} of the broker drain)"
    print(line + f" (floor: end to end >= {FLOOR} records/s)")
    print(f"command: {bl.command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
