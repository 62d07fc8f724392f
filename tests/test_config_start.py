"""What a valid config says at start: the shipped configs pass every start check, safe
defaults that were relaxed are said out loud (by `check-config` on stderr, by `run` in its
log), the config says what it is good for, and a meter's expired calibration shows on records."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from energy_agent.app import config
from energy_agent.app.cli import main
from energy_agent.core.record import GENESIS
from energy_agent.drivers.config import Calibration
from energy_agent.simulators.services import free_port
from tests import factories

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "config").glob("*.yaml"))


def _demo() -> dict:
    return yaml.safe_load((ROOT / "config/demo.yaml").read_text())


def _write(tmp: Path, data: dict) -> Path:
    path = tmp / "plant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_pass_every_start_check(path):
    assert len(SHIPPED) >= 2
    loaded = config.load(path)
    assert loaded.uses() == ["run", "bridge"]
    for command in ("check-config", "run", "bridge"):
        warnings = loaded.check_start(command)
        assert all("plaintext" not in w for w in warnings)


def test_check_config_says_what_the_file_is_for_and_prints_warnings(capsys):
    assert main(["check-config", "-c", str(ROOT / "config/demo.yaml")]) == 0
    out = capsys.readouterr()
    assert "good for run (2 machines, 2 meters, 2 CNCs) and bridge (MQTT 127.0.0.1:1883 to http://127.0.0.1:8086)" in out.out
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: ")]
    assert ("warning: OPC UA security policy None (no signature, no encryption) for CNCs cnc-1, cnc-2: "
            "set security.policy Basic256Sha256 where the server offers it") in warnings
    assert out.err.splitlines() == warnings  # one line each, nothing else


def test_a_bridge_only_config_is_valid_for_the_bridge(tmp_path, capsys):
    data = {"site": "plant", "agent_id": "bridge-1", "mqtt": {"host": "broker.plant.local"},
            "influx": {"url": "http://influx.plant.local:8086", "database": "energy"}}
    path = _write(tmp_path, data)
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert "good for bridge (MQTT broker.plant.local:1883" in out.out and "run (" not in out.out
    assert out.err == ""
    assert config.load(path).check_start("bridge") == []


def test_plaintext_credentials_only_when_allowed_and_then_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PLANT_MQTT_PASSWORD", "not-logged")
    data = _demo()
    data["mqtt"].update(username="gw", password_env="PLANT_MQTT_PASSWORD")
    path = _write(tmp_path, data)
    assert main(["check-config", "-c", str(path)]) == 2
    assert "mqtt.username: credentials without a tls section" in capsys.readouterr().err
    data["mqtt"]["allow_plaintext_credentials"] = True
    path = _write(tmp_path, data)
    assert main(["check-config", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert ("warning: mqtt: user 'gw' and its password go to 127.0.0.1:1883 in plaintext "
            "(allow_plaintext_credentials: true)") in err
    assert "not-logged" not in err
    assert any("plaintext" in w for w in config.load(path).check_start("bridge"))
    data["mqtt"]["tls"] = {}
    assert not any("plaintext" in w for w in config.load(_write(tmp_path, data)).check_start("run"))


def test_run_logs_the_warnings_at_start(tmp_path):
    """The real `run` (its devices and broker absent): the warnings are in its log before the
    agent runs, and it stops cleanly on SIGTERM once it does."""
    data = _demo()
    data.pop("clock")
    data["ledger"] = {"path": "state/ledger.db"}
    data["meters"][0]["port"] = data["meters"][1]["port"] = free_port()
    data["mqtt"] = {"host": "127.0.0.1", "port": free_port(), "username": "gw", "password_env": "PLANT_MQTT_PASSWORD",
                    "allow_plaintext_credentials": True}
    path = _write(tmp_path, data)
    env = {**os.environ, "PLANT_MQTT_PASSWORD": "not-logged"}
    proc = subprocess.Popen([sys.executable, "-m", "energy_agent", "run", "-c", str(path)], stderr=subprocess.PIPE,
                            text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120  # the kernels may compile first
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if " running: " in line:  # "agent demo-plant/demo-gw running: 2 meters, ..."
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    log = "".join(lines) + rest
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert any("mqtt: user 'gw' and its password go to" in w and "in plaintext" in w for w in warnings), log
    assert any("OPC UA security policy None" in w and "cnc-1, cnc-2" in w for w in warnings), log
    assert "not-logged" not in log
    assert proc.returncode == 0, log


def test_expired_calibration_and_factor_are_warned_at_start(tmp_path):
    data = _demo()
    data["meters"][0]["calibration"]["valid_until"] = dt.date(2026, 3, 31)
    data["emission_factors"]["cn-2023"]["valid_to"] = dt.date(2026, 6, 30)
    loaded = config.load(_write(tmp_path, data))
    warnings = loaded.check_start("run", today=dt.date(2026, 7, 1))
    assert ("meter calibration expired: pm-1 (valid until 2026-03-31); records of their jobs carry the flag "
            "meter_calibration_expired") in warnings
    assert any(w.startswith("emission factor not valid today: cn-2023 (valid until 2026-06-30)") for w in warnings)
    assert not any("calibration" in w or "emission factor" in w
                   for w in loaded.check_start("run", today=dt.date(2026, 3, 31)))


def test_meter_calibration_expired_is_flagged_on_records(monkeypatch):
    start_day = dt.datetime.fromtimestamp(factories.T0, dt.timezone.utc).date()  # the job's start day

    def flags(valid_until: dt.date | None) -> tuple[str, ...]:
        meter = factories.METER.model_copy(update={"calibration": Calibration(certificate="C-1", valid_until=valid_until)})
        monkeypatch.setattr(factories, "METER", meter)
        return factories.build(1, GENESIS).quality.flags

    assert "meter_calibration_expired" in flags(start_day - dt.timedelta(days=1))
    assert "meter_calibration_expired" not in flags(start_day)  # valid through its last day
    assert "meter_calibration_expired" not in flags(start_day + dt.timedelta(days=365))
    assert "meter_calibration_expired" not in flags(None)


def test_yaml_reading_keeps_what_yaml_allows(tmp_path):
    """A UTF-8 BOM, exponent floats, anchors and merge keys whose defaults a key overrides: accepted."""
    text = (ROOT / "config/demo.yaml").read_text()
    text = text.replace("    value: 0.6592\n", "    value: 6592e-4\n")
    text = text.replace("  - {id: pm-1, host: 127.0.0.1, port: 5020, unit_id: 1,",
                        "  - {<<: &gateway {host: 127.0.0.1, port: 4999}, id: pm-1, port: 5020, unit_id: 1,")
    text = text.replace("  - {id: pm-2, host: 127.0.0.1, port: 5020, unit_id: 2,",
                        "  - {<<: *gateway, id: pm-2, port: 5020, unit_id: 2,")
    assert text.count("gateway") == 2
    path = tmp_path / "plant.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    cfg = config.load(path).config
    assert cfg.emission_factors["vn-2023"].value == 0.6592
    assert [(m.host, m.port) for m in cfg.meters] == [("127.0.0.1", 5020)] * 2  # the keys override the merged ones


def test_schema_keeps_working_and_shows_the_rules(capsys):
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    defs = schema["$defs"]
    assert defs["MeterDevice"]["properties"]["port"]["type"] == "integer"
    assert "allow_plaintext_credentials" in defs["MqttConfig"]["properties"]
    assert list(schema["properties"]["emission_factors"]["patternProperties"]) == [config.ID_PATTERN]
