"""``simulate`` and ``demo``: the simulated plant. The simulators are a tool these two commands
load; no other command imports ``energy_agent.simulators`` or ``energy_agent.app.demo``."""

from __future__ import annotations

import argparse
import asyncio
from importlib import resources
from pathlib import Path

from energy_agent.app.cli.common import add_command
from energy_agent.core.errors import ConfigError


def register(commands) -> None:
    add_command(commands, "simulate", cmd_simulate, "serve simulated meters and CNCs for a scenario",
                description="Serve a scenario's simulated meters (Modbus) and CNCs (OPC UA), or print the "
                            "exact energy of its jobs (--truth). The scenario is a .yaml file or the name "
                            "of a scenario shipped with the package, such as demo.",
                define=_simulate_arguments, log_level="INFO")

    s = add_command(commands, "demo", cmd_demo, "run a simulated plant end to end and print the per-job table")
    s.add_argument("--scenario", default=None,
                   help="scenario .yaml or the name of a shipped scenario (default: demo)")
    s.add_argument("--workdir", default=None, help="keep files here instead of a temporary directory")


def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    from energy_agent.simulators import serve

    serve.add_arguments(p)


def scenario_path(ref: str) -> str:
    """``ref`` if it is a file, else the scenario of that name shipped in ``energy_agent.simulators``."""
    if Path(ref).is_file():
        return ref
    shipped = resources.files("energy_agent.simulators").joinpath("scenarios")
    names = sorted(f.name[:-len(".yaml")] for f in shipped.iterdir() if f.name.endswith(".yaml"))
    if ref not in names:
        raise ConfigError(f"scenario {ref!r}: no such file, nor a shipped scenario (shipped: {', '.join(names)})")
    return str(shipped.joinpath(f"{ref}.yaml"))


def cmd_simulate(args: argparse.Namespace) -> int:
    from energy_agent.simulators import serve

    args.scenario = scenario_path(args.scenario)
    return asyncio.run(serve.run(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from energy_agent.app import demo

    if args.scenario:
        args.scenario = scenario_path(args.scenario)
    return demo.main(args)
