"""``check-config``, ``schema`` and ``example-config``: the configuration file and its model."""

from __future__ import annotations

import argparse
import json
import sys

from energy_agent.app.cli.common import EXIT_OK, add_command, load_config


def register(commands) -> None:
    add_command(commands, "check-config", cmd_check,
                "validate a config file (its profiles, node maps, certificates and secrets) as run and bridge do",
                needs_config=True)
    add_command(commands, "schema", cmd_schema, "print the config's JSON Schema")
    s = add_command(commands, "example-config", cmd_example,
                    "print the commented example plant config shipped with the package",
                    description="Print the commented example plant config shipped with the package, to "
                                "start your own from: energy-agent example-config > plant.yaml")
    s.add_argument("--demo", action="store_true",
                   help="the demo plant's config instead (`energy-agent demo` runs it with its own ports and ledger)")
    s.add_argument("--path", action="store_true", help="print where the installed file is instead of its content")


def cmd_check(args: argparse.Namespace) -> int:
    """0 when the config is valid (its warnings on stderr); a ConfigError (exit 2) names what is
    not. Checks what ``run`` and ``bridge`` check at start: the model, the profiles and node maps,
    the certificates, keys and secrets it names, and says which of the two the file is for."""
    loaded = load_config(args.config)
    for warning in loaded.check_start("check-config"):
        print(f"warning: {warning}", file=sys.stderr)
    cfg = loaded.config
    uses = []
    if "run" in loaded.uses():
        uses.append(f"run ({len(cfg.machines)} machines, {len(cfg.meters)} meters, {len(cfg.cncs)} CNCs)")
    if "bridge" in loaded.uses():
        assert cfg.mqtt is not None and cfg.influx is not None
        uses.append(f"bridge (MQTT {cfg.mqtt.host}:{cfg.mqtt.port} to {cfg.influx.url})")
    print(f"{args.config}: OK — site {cfg.site}, agent {cfg.agent_id}; good for {' and '.join(uses)}; "
          f"config hash {cfg.config_hash()[:16]}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from energy_agent.app.config import json_schema

    json.dump(json_schema(), sys.stdout, indent=2)
    print()
    return EXIT_OK


def cmd_example(args: argparse.Namespace) -> int:
    from energy_agent import examples

    path = examples.DEMO if args.demo else examples.PLANT_EXAMPLE
    if args.path:
        print(path)
    else:
        sys.stdout.write(path.read_text(encoding="utf-8"))
    return EXIT_OK
