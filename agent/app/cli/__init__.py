"""The ``energy-agent`` command line: :func:`main` and the parser.

One module per command group registers its commands (``run``: run, bridge; ``ledger``: jobs,
verify, replay; ``devices``: probe, certs; ``config``: check-config, schema, example-config;
``kernels``; ``simulation``: simulate, demo) and imports what they need only when one of them
runs, so that ``energy-agent run`` never loads the simulators. Every command that reads a config
takes it as ``-c/--config FILE`` (default ``$ENERGY_AGENT_CONFIG``); the global options are
accepted before the command and after it. Exit codes: 0 ok, 1 failure, 2 configuration or usage
error.
"""

from __future__ import annotations

import argparse
import sys

from energy_agent.app.cli import config, devices, kernels, ledger, run, simulation
from energy_agent.app.cli.common import (
    CONFIG_ENV,
    EXIT_CONFIG,
    EXIT_FAILURE,
    Command,
    global_options,
    setup_logging,
)
from energy_agent.core.errors import AgentError, ConfigError

GROUPS = (run, ledger, devices, config, kernels, simulation)
"""The command modules, in the order ``energy-agent --help`` lists their commands."""

DESCRIPTION = ("Shop-floor energy metering agent: run the agent or the bridge, serve simulators, "
               "inspect configs and ledgers.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-agent", description=DESCRIPTION, parents=[global_options(None)],
                                epilog=f"A command that reads a config takes -c/--config FILE, else ${CONFIG_ENV}.")
    commands = p.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND",
                                parser_class=Command,
                                help="`energy-agent COMMAND -h` shows the command's options")
    for group in GROUPS:
        group.register(commands)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    if args.default_log_level is not None:
        setup_logging(args.log_level or args.default_log_level, args.log_format)
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
