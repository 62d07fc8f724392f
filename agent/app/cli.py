"""``energy-agent``: run the agent or the bridge, serve simulators, inspect configs and ledgers."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from energy_agent import __version__
from energy_agent.core.errors import AgentError, ConfigError

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("asyncua", "pymodbus"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)


def _serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> int:
    """Run ``main(stop)`` until SIGINT/SIGTERM sets ``stop``."""

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    result = asyncio.run(runner())
    return result if isinstance(result, int) else 0


def _load(path: str):
    from energy_agent.app import config

    loaded = config.load(path)
    return loaded


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    _setup_logging(args.log_level or loaded.config.log_level)
    from energy_agent.app.runtime import Agent

    agent = Agent(loaded)
    agent.stats_interval_s = args.stats_interval
    agent.stats_file = Path(args.stats_file) if args.stats_file else None
    _serve(agent.run)
    if agent.fatal:
        print(f"energy-agent: stopped: {agent.fatal}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    _setup_logging(args.log_level or loaded.config.log_level)
    from energy_agent.bridge.bridge import run_bridge

    settings = loaded.bridge_settings()
    return _serve(lambda stop: run_bridge(settings, stop))


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
    cfg = loaded.config
    print(f"{args.file}: OK — site {cfg.site}, agent {cfg.agent_id}: {len(cfg.machines)} machines, "
          f"{len(cfg.meters)} meters, {len(cfg.cncs)} CNCs; config hash {cfg.config_hash()[:16]}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from energy_agent.app.config import json_schema

    json.dump(json_schema(), sys.stdout, indent=2)
    print()
    return 0


JOB_COLUMNS = ("machine", "seq", "job", "program", "serial", "start", "end", "kwh", "kgco2e", "method", "coverage")


def _job_row(r: dict) -> dict:
    return {
        "machine": r["machine"], "seq": r["seq"], "job": r["job"]["key"], "program": r["job"]["program"] or "",
        "serial": r["job"]["serial"] or "", "start": r["start"], "end": r["end"],
        "kwh": f"{r['energy']['kwh']:.6f}", "kgco2e": f"{r['emissions']['kgco2e']:.6f}",
        "method": r["energy"]["method"], "coverage": f"{r['quality']['coverage']:.4f}",
    }


def print_table(rows: list[dict], columns: tuple[str, ...] | list[str], out=None) -> None:
    out = out or sys.stdout
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    out.write("  ".join(c.ljust(widths[c]) for c in columns) + "\n")
    for r in rows:
        out.write("  ".join(str(r[c]).ljust(widths[c]) for c in columns) + "\n")


def cmd_jobs(args: argparse.Namespace) -> int:
    from energy_agent.records import record
    from energy_agent.records.ledger import Ledger

    loaded = _load(args.config)
    cfg = loaded.config
    path = cfg.ledger.path if cfg.ledger.path.is_absolute() else loaded.base / cfg.ledger.path
    if not path.exists():
        raise ConfigError(f"ledger.path: {path} does not exist (has the agent run?)")
    since = None
    if args.since:
        try:
            dt = datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--since: {args.since!r} is not an ISO 8601 time") from None
        since = record.iso((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp())
    ledger = Ledger(path)
    try:
        recs = ledger.records(machine=args.machine, since=since, limit=args.limit)
    finally:
        ledger.close_sync()
    if args.format == "json":
        for r in recs:
            print(json.dumps(r, ensure_ascii=False))
    elif args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=JOB_COLUMNS)
        w.writeheader()
        w.writerows(_job_row(r) for r in recs)
    else:
        print_table([_job_row(r) for r in recs], JOB_COLUMNS)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from energy_agent.records.ledger import Ledger
    from energy_agent.records.record import verify_chain

    loaded = _load(args.config)
    cfg = loaded.config
    path = cfg.ledger.path if cfg.ledger.path.is_absolute() else loaded.base / cfg.ledger.path
    ledger = Ledger(path)
    try:
        recs = ledger.records()
        anchors = ledger.anchors()
    finally:
        ledger.close_sync()
    problems = verify_chain(recs, anchors)
    for p in problems:
        print(p)
    print(f"{len(recs)} records, {len({r['machine'] for r in recs})} machines: "
          + ("chains intact" if not problems else f"{len(problems)} problems"))
    return 0 if not problems else EXIT_FAILURE


def _since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--since: {text!r} is not an ISO 8601 date or time") from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def cmd_replay(args: argparse.Namespace) -> int:
    """``energy-agent replay``: 0 when every replayed job is identical, 1 otherwise."""
    from energy_agent.records import record
    from energy_agent.records.ledger import Ledger
    from energy_agent.records.replay import replay, summary

    loaded = _load(args.config)
    cfg = loaded.config
    ledger_path = cfg.ledger.path if cfg.ledger.path.is_absolute() else loaded.base / cfg.ledger.path
    folder = cfg.archive.folder(cfg.ledger.path, loaded.base)
    if not ledger_path.exists():
        raise ConfigError(f"ledger.path: {ledger_path} does not exist (has the agent run?)")
    if not folder.is_dir():
        raise ConfigError(f"archive.path: {folder} does not exist (has the agent run with the archive on?)")
    since = _since(args.since)
    ledger = Ledger(ledger_path)
    try:
        recs = ledger.records(machine=args.machine, since=None if since is None else record.iso(since))
    finally:
        ledger.close_sync()
    show = args.progress or sys.stderr.isatty()
    rep = replay(folder, recs, machine=args.machine, since=since, progress=sys.stderr if show else None)
    summary(rep, sys.stdout)
    return 0 if rep.ok else 1


def cmd_probe(args: argparse.Namespace) -> int:
    from energy_agent.app.probe import probe

    loaded = _load(args.config)
    res = asyncio.run(probe(loaded, args.device))
    if res.rows:
        print_table(res.rows, list(res.rows[0]))
    for w in res.warnings:
        print(f"warning: {w}")
    if res.error:
        print(f"{args.device}: FAILED: {res.error}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{args.device}: {'OK' if res.ok else f'{len(res.warnings)} warnings'}")
    return 0 if res.ok else EXIT_FAILURE


def cmd_certs(args: argparse.Namespace) -> int:
    from energy_agent.app import certs

    return certs.run(args)


def cmd_kernels(args: argparse.Namespace) -> int:
    import time

    from energy_agent.domain import energy

    started = time.perf_counter()
    energy.warm_up()
    energy.warm_up_batch()
    print(f"kernels compiled into numba's cache (or loaded from it) in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from energy_agent.simulators import serve

    _setup_logging(args.log_level or "INFO")
    return asyncio.run(serve.run(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from energy_agent.app import demo

    _setup_logging(args.log_level or "WARNING")
    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"energy-agent {__version__}")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run the agent (poll devices, compute job energy, store and publish records)")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--stats-interval", type=float, default=None, metavar="S",
                   help="log polls and meter-poll lateness (p50, p99, max) every S seconds")
    s.add_argument("--stats-file", default=None, metavar="PATH",
                   help="write those stats as JSON at every interval and at exit")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("bridge", help="run the MQTT → InfluxDB bridge")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=cmd_bridge)

    s = sub.add_parser("check-config", help="validate a config file (and its profiles and node maps)")
    s.add_argument("file")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("schema", help="print the config's JSON Schema")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("jobs", help="list job records from the local ledger")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--machine")
    s.add_argument("--since", help="ISO time: records whose job started at or after it")
    s.add_argument("--limit", type=int)
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_jobs)

    s = sub.add_parser("verify", help="verify the ledger's per-machine hash chains")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("replay", help="recompute archived jobs with the agent's kernels and compare with the ledger")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--machine")
    s.add_argument("--since", help="ISO date or time: jobs that started at or after it")
    s.add_argument("--progress", action="store_true", help="draw a progress bar on stderr even when it is not a terminal")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("probe", help="read one meter or CNC once and show decoded values with plausibility checks")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("device", help="a meter or CNC id from the config")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("certs", help="create a self-signed OPC UA client certificate and key")
    from energy_agent.app import certs

    certs.add_arguments(s)
    s.set_defaults(func=cmd_certs)

    s = sub.add_parser("kernels", help="compile the energy kernels into numba's cache (done by make at install)")
    s.add_argument("action", choices=["build"], help="build: compile every kernel now, so the agent only loads them")
    s.set_defaults(func=cmd_kernels)

    s = sub.add_parser("simulate", help="serve simulated meters and CNCs for a scenario")
    from energy_agent.simulators import serve

    serve.add_arguments(s)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("demo", help="run a simulated plant end to end and print the per-job table")
    s.add_argument("--scenario", default=None, help="scenario file (default: the built-in demo)")
    s.add_argument("--workdir", default=None, help="keep files here instead of a temporary directory")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"energy-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"energy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
