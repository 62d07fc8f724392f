"""Configuration: the shipped configs load, and every bad input names the field and the thing."""

from pathlib import Path

import pytest
import yaml

from energy_agent.app import config
from energy_agent.app.cli import main
from energy_agent.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _demo() -> dict:
    return yaml.safe_load((ROOT / "config/demo.yaml").read_text())


@pytest.mark.parametrize("name", ["plant.example.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    loaded = config.load(ROOT / "config" / name)
    cfg = loaded.config
    assert cfg.machines and cfg.meters and cfg.cncs
    for m in cfg.machines:
        assert m.meter in loaded.profiles
        assert m.cnc in loaded.node_ids
        assert all(nid.startswith(("ns=", "nsu=")) for nid in loaded.node_ids[m.cnc].values())


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(data, ROOT / "config")
    return str(info.value)


def test_unknown_meter_named_with_known_ones():
    d = _demo()
    d["machines"][1]["meter"] = "pm-7"
    assert _error(d) == "machines[1].meter: unknown meter 'pm-7' (known: pm-1, pm-2)"


def test_meter_shared_by_two_machines():
    d = _demo()
    d["machines"][1]["meter"] = "pm-1"
    assert "machines[1].meter: meter 'pm-1' is already assigned to machine 'm1'" in _error(d)


def test_cnc_shared_by_two_machines_and_machine_without_cnc():
    d = _demo()
    d["machines"][1]["cnc"] = "cnc-1"
    assert "machines[1].cnc: cnc 'cnc-1' is already assigned to machine 'm1'" in _error(d)
    d = _demo()
    del d["machines"][0]["cnc"]
    assert _error(d).startswith("machines[0].cnc: Field required")


def test_duplicate_device_id():
    d = _demo()
    d["cncs"][1]["id"] = "pm-1"
    assert "cncs[1].id: duplicate id 'pm-1' (also meters[0].id)" in _error(d)


def test_unknown_emission_factor():
    d = _demo()
    d["machines"][0]["emission_factor"] = "vn-2030"
    assert "machines[0].emission_factor: unknown factor 'vn-2030' (declared: cn-2023, vn-2023)" in _error(d)


def test_field_type_errors_name_the_path():
    d = _demo()
    d["meters"][1]["port"] = 70000
    msg = _error(d)
    assert msg.startswith("meters[1].port:"), msg
    d = _demo()
    d["meters"][0]["unit_id"] = "one"
    assert _error(d).startswith("meters[0].unit_id:")


def test_unknown_key_is_rejected():
    d = _demo()
    d["machines"][0]["metre"] = "pm-1"
    assert "machines[0].metre: Extra inputs are not permitted" in _error(d)


def test_unknown_profile_lists_builtins():
    d = _demo()
    d["meters"][0]["profile"] = "acme-9000"
    msg = _error(d)
    assert msg.startswith("meters[0].profile (pm-1): meter profile 'acme-9000' not found")
    assert "eastron-sdm630" in msg and "schneider-iem3000" in msg


def test_node_map_param_missing():
    d = _demo()
    del d["cncs"][0]["params"]["job"]
    assert "cncs[0].params (cnc-1): node map 'opc40502' needs params ['job']" in _error(d)


def test_scaled_clock_needs_anchor():
    d = _demo()
    d["clock"] = {"speed": 10}
    assert "clock: a clock speed other than 1 needs an anchor" in _error(d)


def test_bad_profile_file_is_named(tmp_path):
    bad = tmp_path / "meter.yaml"
    bad.write_text(yaml.safe_dump({
        "name": "x", "vendor": "v", "model": "m", "document": "d",
        "points": {"power_w": {"address": 0, "function": "input", "type": "f32"},
                   "energy_import_kwh": {"address": 1, "function": "input", "type": "f32"}},
    }))
    d = _demo()
    d["meters"][0]["profile"] = str(bad)
    msg = _error(d)
    assert "meters[0].profile (pm-1)" in msg and "energy_import_kwh overlaps power_w in input registers" in msg


def test_config_hash_ignores_formatting(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text((ROOT / "config/demo.yaml").read_text())
    b.write_text("# a comment\n" + yaml.safe_dump(_demo(), sort_keys=True))
    ha = config.parse(yaml.safe_load(a.read_text()), ROOT / "config").config.config_hash()
    hb = config.parse(yaml.safe_load(b.read_text()), ROOT / "config").config.config_hash()
    assert ha == hb and len(ha) == 64


def test_cli_check_config(capsys, tmp_path):
    assert main(["check-config", "-c", str(ROOT / "config/plant.example.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    d = _demo()
    d["machines"][0]["cnc"] = "cnc-9"
    bad.write_text(yaml.safe_dump(d))
    assert main(["check-config", "-c", str(bad)]) == 2
    assert "machines[0].cnc: unknown cnc 'cnc-9' (known: cnc-1, cnc-2)" in capsys.readouterr().err


def test_cli_schema_is_json_schema(capsys):
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object" and "machines" in schema["properties"]
