"""``probe`` and ``certs``: commissioning one device, and the OPC UA client certificate."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from energy_agent.app.cli.common import (
    CONFIG_ENV,
    EXIT_FAILURE,
    EXIT_OK,
    add_command,
    load_config,
    print_table,
)
from energy_agent.core.errors import ConfigError


def register(commands) -> None:
    s = add_command(commands, "probe", cmd_probe,
                    "read one meter or CNC once and show decoded values with plausibility checks",
                    needs_config=True)
    s.add_argument("device", help="a meter or CNC id from the config")

    add_command(commands, "certs", cmd_certs, "create a self-signed OPC UA client certificate and key",
                description="Create a self-signed OPC UA client certificate and key. Paths and URI come "
                            f"from the config (-c FILE, else ${CONFIG_ENV}); without one, give --uri, "
                            "--cert and --key.",
                define=_certs_arguments)


def _certs_arguments(p: argparse.ArgumentParser) -> None:
    from energy_agent.app import certs  # cryptography loads only for this command

    certs.add_arguments(p)


def cmd_probe(args: argparse.Namespace) -> int:
    """0 when the device answered with plausible values; 1 on failure or warnings."""
    from energy_agent.app.probe import probe

    res = asyncio.run(probe(load_config(args.config), args.device))
    if res.rows:
        print_table(res.rows, list(res.rows[0]))
    for n in res.notes:
        print(f"note: {n}")
    for w in res.warnings:
        print(f"warning: {w}")
    if res.error:
        print(f"{args.device}: FAILED: {res.error}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{args.device}: {'OK' if res.ok else f'{len(res.warnings)} warnings'}")
    return EXIT_OK if res.ok else EXIT_FAILURE


def cmd_certs(args: argparse.Namespace) -> int:
    from energy_agent.app import certs

    if not args.config and not (args.uri and args.cert and args.key):
        args.config = os.environ.get(CONFIG_ENV) or None
        if not args.config:
            raise ConfigError(f"certs: give -c/--config FILE (or set {CONFIG_ENV}) [--device CNC], "
                              "or --uri, --cert and --key")
    return certs.run(args)
