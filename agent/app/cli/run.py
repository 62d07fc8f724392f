"""``run`` (the agent) and ``bridge`` (MQTT to InfluxDB): services that run until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from energy_agent.app.cli.common import EXIT_FAILURE, EXIT_OK, add_command, load_config, serve, setup_logging

log = logging.getLogger("energy_agent.app")


def register(commands) -> None:
    s = add_command(commands, "run", cmd_run,
                    "run the agent (poll devices, compute job energy, store and publish records)",
                    needs_config=True, log_level=None)
    s.add_argument("--stats-interval", type=float, default=None, metavar="S",
                   help="log polls and meter-poll lateness (p50, p99, max) every S seconds")
    s.add_argument("--stats-file", default=None, metavar="PATH",
                   help="write those stats as JSON at every interval and at exit")

    add_command(commands, "bridge", cmd_bridge, "run the MQTT → InfluxDB bridge", needs_config=True, log_level=None)


def cmd_run(args: argparse.Namespace) -> int:
    """0 after a clean stop; 1 when the agent stopped on a fatal error."""
    loaded = load_config(args.config)
    setup_logging(args.log_level or loaded.config.log_level, args.log_format)
    for warning in loaded.check_start("run"):
        log.warning("%s", warning)
    from energy_agent.app.runtime import Agent

    agent = Agent(loaded)
    agent.stats_interval_s = args.stats_interval
    agent.stats_file = Path(args.stats_file) if args.stats_file else None
    serve(agent.run)
    if agent.fatal:
        print(f"energy-agent: stopped: {agent.fatal}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_bridge(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    setup_logging(args.log_level or loaded.config.log_level, args.log_format)
    for warning in loaded.check_start("bridge"):
        log.warning("%s", warning)
    from energy_agent.bridge.bridge import run_bridge

    settings = loaded.bridge_settings()
    return serve(lambda stop: run_bridge(settings, stop))
