"""``jobs``, ``verify`` and ``replay``: read the local ledger (and the archive) of a config."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from energy_agent.app.cli.common import EXIT_FAILURE, EXIT_OK, add_command, epoch, load_config, print_table
from energy_agent.core.errors import ConfigError
from energy_agent.core.record import JobRecord, JobRecordV1

if TYPE_CHECKING:
    from energy_agent.app.config import Loaded

JOB_COLUMNS = ("machine", "seq", "job", "program", "serial", "start", "end", "kwh", "kgco2e", "method", "coverage")


def register(commands) -> None:
    s = add_command(commands, "jobs", cmd_jobs, "list job records from the local ledger", needs_config=True)
    s.add_argument("--machine", metavar="ID", help="only this machine's records")
    s.add_argument("--since", metavar="ISO", help="ISO time: records whose job started at or after it")
    s.add_argument("--limit", type=int, metavar="N", help="at most N records (the first N in ledger order)")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (default), json (one record per line, as stored) or csv (the table's columns)")

    add_command(commands, "verify", cmd_verify, "verify the ledger's per-machine hash chains", needs_config=True)

    s = add_command(commands, "replay", cmd_replay,
                    "recompute archived jobs with the agent's kernels and compare with the ledger",
                    needs_config=True)
    s.add_argument("--machine", metavar="ID", help="only this machine's jobs")
    s.add_argument("--since", metavar="ISO", help="ISO date or time: jobs that started at or after it")
    s.add_argument("--progress", action="store_true",
                   help="draw a progress bar on stderr even when it is not a terminal")


def _existing_ledger(loaded: Loaded) -> Path:
    path = loaded.ledger_path()
    if not path.exists():
        raise ConfigError(f"ledger.path: {path} does not exist (has the agent run?)")
    return path


def _job_row(r: JobRecord | JobRecordV1) -> dict:
    """One job record as a row of JOB_COLUMNS (the table and csv formats)."""
    serial = r.job.serial if isinstance(r, JobRecordV1) else ",".join(r.job.serials)
    return {
        "machine": r.machine, "seq": r.seq, "job": r.job.key, "program": r.job.program or "",
        "serial": serial or "", "start": r.start, "end": r.end,
        "kwh": "unknown" if r.energy.kwh is None else f"{r.energy.kwh:.6f}",
        "kgco2e": "unknown" if r.emissions.kgco2e is None else f"{r.emissions.kgco2e:.6f}",
        "method": r.energy.method, "coverage": f"{r.quality.coverage:.4f}",
    }


def cmd_jobs(args: argparse.Namespace) -> int:
    from energy_agent.records import record
    from energy_agent.records.ledger import Ledger

    path = _existing_ledger(load_config(args.config))
    since = epoch(args.since, "--since")
    ledger = Ledger(path)
    try:
        recs = ledger.records(machine=args.machine, since=None if since is None else record.iso(since),
                              limit=args.limit)
    finally:
        ledger.close_sync()
    recs = [r for r in recs if isinstance(r, (JobRecord, JobRecordV1))]
    if args.format == "json":
        for r in recs:
            print(r.canonical().decode())
    elif args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=JOB_COLUMNS)
        w.writeheader()
        w.writerows(_job_row(r) for r in recs)
    else:
        print_table([_job_row(r) for r in recs], JOB_COLUMNS)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """0 when every chain is intact, 1 otherwise (each problem on a line)."""
    from energy_agent.records.ledger import Ledger
    from energy_agent.records.record import verify_chain

    ledger = Ledger(load_config(args.config).ledger_path())
    try:
        recs = ledger.records()
        anchors = ledger.anchors()
    finally:
        ledger.close_sync()
    problems = verify_chain(recs, anchors)
    for p in problems:
        print(p)
    print(f"{len(recs)} records, {len({r.machine for r in recs})} machines: "
          + ("chains intact" if not problems else f"{len(problems)} problems"))
    return EXIT_OK if not problems else EXIT_FAILURE


def cmd_replay(args: argparse.Namespace) -> int:
    """0 when every replayed job is identical, 1 otherwise."""
    from energy_agent.records import record
    from energy_agent.records.ledger import Ledger
    from energy_agent.records.replay import replay, summary

    loaded = load_config(args.config)
    cfg = loaded.config
    ledger_path = _existing_ledger(loaded)
    folder = cfg.archive.folder(cfg.ledger.path, loaded.base)
    if not folder.is_dir():
        raise ConfigError(f"archive.path: {folder} does not exist (has the agent run with the archive on?)")
    since = epoch(args.since, "--since")
    ledger = Ledger(ledger_path)
    try:
        recs = ledger.records(machine=args.machine, since=None if since is None else record.iso(since))
    finally:
        ledger.close_sync()
    show = args.progress or sys.stderr.isatty()
    rep = replay(folder, recs, machine=args.machine, since=since, progress=sys.stderr if show else None)
    summary(rep, sys.stdout)
    return EXIT_OK if rep.ok else EXIT_FAILURE
