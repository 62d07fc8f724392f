"""The command line: the parser (help everywhere, global options on either side of the command,
the config from -c or the environment), commands loading only what they use, and `jobs` and
`verify` on a ledger written by the agent's own code."""

import argparse
import csv
import io
import json
import sqlite3
import subprocess
import sys

import pytest
import yaml

from energy_agent import examples
from energy_agent.app.cli import build_parser, main
from energy_agent.app.cli.common import CONFIG_ENV, Command
from energy_agent.records.ledger import Ledger
from tests import factories

COMMANDS = {"run", "bridge", "jobs", "verify", "replay", "probe", "certs", "check-config", "schema",
            "example-config", "kernels", "simulate", "demo"}


def _commands(parser: argparse.ArgumentParser) -> dict[str, Command]:
    """The sub-command parsers, their arguments defined (the lazy ones too)."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in sub.choices.values():
        command.define()
    return dict(sub.choices)


def _positionals(command: Command) -> list[str]:
    """A valid value for each positional argument of ``command``."""
    return [a.choices[0] if a.choices else "x" for a in command._actions if not a.option_strings]


def test_every_command_option_and_positional_has_help():
    parser = build_parser()
    missing = []

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{p.prog}: {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                missing.extend(f"{p.prog} {c.dest}: no help" for c in action._choices_actions if not c.help)
                for command in _commands(p).values():
                    walk(command)

    walk(parser)
    assert not missing, "\n".join(missing)
    commands = _commands(parser)
    assert set(commands) == COMMANDS
    assert "--truth" in commands["simulate"].format_help() and "--uri" in commands["certs"].format_help()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_global_options_before_or_after_the_command(name, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "plant.yaml")
    args = [name, *_positionals(_commands(build_parser())[name])]
    assert build_parser().parse_args(args).log_level is None
    assert build_parser().parse_args(["--log-level", "ERROR", *args]).log_level == "ERROR"
    assert build_parser().parse_args([*args, "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert build_parser().parse_args(["--log-level", "ERROR", *args, "--log-level", "INFO"]).log_level == "INFO"


def test_log_level_after_run_is_accepted_by_the_command():
    out = subprocess.run([sys.executable, "-m", "energy_agent", "run", "-c", "missing.yaml", "--log-level", "DEBUG"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "energy-agent: configuration error:" in out.stderr and "missing.yaml" in out.stderr


def test_config_from_the_option_else_the_environment_else_a_usage_error(monkeypatch, capsys):
    needs = sorted(n for n, c in _commands(build_parser()).items() if c.needs_config)
    assert {"run", "bridge", "jobs", "verify", "replay", "probe", "check-config"} <= set(needs)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    for name in needs:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([name, *_positionals(_commands(build_parser())[name])])
        assert exc.value.code == 2
        assert "-c/--config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-config"])
    err = capsys.readouterr().err
    assert "energy-agent check-config: error:" in err and "-c/--config FILE" in err and CONFIG_ENV in err

    monkeypatch.setenv(CONFIG_ENV, str(examples.DEMO))
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out.startswith(f"{examples.DEMO}: OK")
    assert main(["check-config", "-c", str(examples.PLANT_EXAMPLE)]) == 0  # the option wins
    assert capsys.readouterr().out.startswith(f"{examples.PLANT_EXAMPLE}: OK")


def test_example_config_prints_the_shipped_file_and_its_path(capsys):
    assert main(["example-config"]) == 0
    assert capsys.readouterr().out == examples.PLANT_EXAMPLE.read_text()
    assert main(["example-config", "--demo"]) == 0
    assert capsys.readouterr().out == examples.DEMO.read_text()
    assert main(["example-config", "--path"]) == 0
    path = capsys.readouterr().out.strip()
    assert main(["check-config", "-c", path]) == 0


def test_simulate_takes_a_shipped_scenario_by_name(capsys):
    from energy_agent.simulators.plant import DEMO_SCENARIO

    assert main(["simulate", str(DEMO_SCENARIO), "--truth"]) == 0
    by_path = capsys.readouterr().out
    assert main(["simulate", "demo", "--truth"]) == 0
    assert capsys.readouterr().out == by_path and json.loads(by_path)
    assert main(["simulate", "no-such-scenario", "--truth"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-scenario': no such file, nor a shipped scenario" in err and "demo" in err


LOADED = """
import sys
from energy_agent.app.cli import build_parser, main

def loaded():
    return sorted(m for m in sys.modules if m.startswith(("energy_agent.simulators", "energy_agent.app.demo")))

assert main(["check-config", "-c", sys.argv[1]]) == 0
assert main(["schema"]) == 0 and main(["example-config"]) == 0
for args in (["run"], ["bridge"], ["jobs"], ["verify"], ["replay"], ["probe", "pm-1"], ["certs"]):
    build_parser().parse_args([*args, "-c", sys.argv[1]])
build_parser().parse_args(["kernels", "build"])
print("before:", loaded())
assert main(["simulate", "demo", "--truth"]) == 0
print("after:", loaded())
"""


def test_only_simulate_and_demo_load_the_simulators():
    out = subprocess.run([sys.executable, "-c", LOADED, str(examples.DEMO)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("before:", "after:"))]
    assert lines[0] == "before: []"
    assert "energy_agent.simulators.scenario" in lines[1]  # the check sees them when they are loaded


async def _ledger(tmp_path):
    cfg = yaml.safe_load(open("config/demo.yaml"))
    cfg["ledger"] = {"path": "ledger.db"}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(cfg))
    led = Ledger(tmp_path / "ledger.db")
    for machine in ("m1", "m2"):
        await factories.fill(led, machine, 3, first=0, site="demo-plant", agent="demo-gw")
    await led.close()
    return tmp_path / "plant.yaml"


async def test_jobs_lists_records_as_table_json_and_csv(tmp_path, capsys):
    cfg = await _ledger(tmp_path)
    assert main(["jobs", "-c", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["machine", "seq", "job", "program"] and len(lines) == 7
    assert main(["jobs", "-c", str(cfg), "--machine", "m2", "--format", "json"]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["machine"], r["seq"]) for r in recs] == [("m2", 1), ("m2", 2), ("m2", 3)]
    assert main(["jobs", "-c", str(cfg), "--format", "csv", "--since", "2026-09-21T14:30:00Z"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["job"] for r in rows} == {"J-1", "J-2"} and float(rows[0]["kwh"]) == 0.6


async def test_verify_passes_then_catches_an_edited_record(tmp_path, capsys):
    cfg = await _ledger(tmp_path)
    assert main(["verify", "-c", str(cfg)]) == 0
    assert "6 records, 2 machines: chains intact" in capsys.readouterr().out
    db = sqlite3.connect(tmp_path / "ledger.db")
    body = json.loads(db.execute("SELECT body FROM records WHERE machine='m1' AND seq=2").fetchone()[0])
    body["energy"]["kwh"] = 0.1  # someone edits the evidence
    db.execute("UPDATE records SET body=? WHERE machine='m1' AND seq=2", (json.dumps(body),))
    db.commit()
    db.close()
    assert main(["verify", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "m1 seq 2" in out and "hash does not match the content" in out


def test_jobs_without_a_ledger_is_a_clear_error(tmp_path, capsys):
    cfg = yaml.safe_load(open("config/demo.yaml"))
    cfg["ledger"] = {"path": "missing.db"}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["jobs", "-c", str(tmp_path / "plant.yaml")]) == 2
    assert "ledger.path:" in capsys.readouterr().err
