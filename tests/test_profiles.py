"""Register codec, profile validation and request coalescing."""

import math
import struct

import pytest

from energy_agent.drivers import codec
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.drivers.profile import (
    PROFILE_DIR,
    MeterProfile,
    decode_block,
    load_profile,
    plan_blocks,
)


@pytest.mark.parametrize("type_, value", [
    ("u16", 65535), ("i16", -2), ("u32", 4_000_000_000), ("i32", -123456), ("u64", 2**63 + 5),
    ("i64", -(2**40) - 3), ("f32", 1234.5), ("f64", -1e-9),
])
@pytest.mark.parametrize("wo", ["big", "little"])
@pytest.mark.parametrize("bo", ["big", "little"])
def test_codec_round_trip(type_, value, wo, bo):
    regs = codec.encode(value, type_, wo, bo)
    assert len(regs) == codec.width(type_) and all(0 <= r <= 0xFFFF for r in regs)
    assert codec.decode(regs, type_, wo, bo) == value


def test_codec_matches_the_wire_format():
    # 1234.5 as IEEE 754 big-endian is 44 9A 50 00: registers 0x449A, 0x5000 (ABCD).
    assert codec.decode([0x449A, 0x5000], "f32") == 1234.5
    assert codec.decode([0x5000, 0x449A], "f32", word_order="little") == 1234.5   # CDAB
    assert codec.decode([0x9A44, 0x0050], "f32", byte_order="little") == 1234.5   # BADC
    assert codec.decode([0x0000, 0x0000, 0x0001, 0x0002], "u64") == 0x10002
    assert math.isnan(codec.decode(list(struct.unpack(">HH", struct.pack(">f", float("nan")))), "f32"))


def test_every_builtin_profile_loads_and_cites_its_source():
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    assert len(names) >= 2
    for name in names:
        prof = load_profile(name)
        assert prof.name == name and prof.document
        assert "energy_import_kwh" in prof.points and "power_w" in prof.points


def test_sdm630_never_reads_across_unmapped_registers():
    # Eastron meters answer exception 2 to a request touching an unmapped register (30055..30072
    # has gaps), so power (30053) and energy (30073) are two requests; adjacent points are one.
    prof = load_profile("eastron-sdm630")
    blocks = plan_blocks(prof, ["power_w", "energy_import_kwh"])
    assert [(b.function, b.start, b.count) for b in blocks] == [("input", 52, 2), ("input", 72, 2)]
    spans = [(b.start, b.count) for b in plan_blocks(prof)]
    assert spans == [(0, 12), (52, 2), (62, 2), (70, 6)] and not any(b.gaps for b in plan_blocks(prof))


def test_coalescing_respects_gap_and_size():
    pts = {q: {"address": a, "function": "holding", "type": "f32"} for q, a in
           [("power_w", 0), ("energy_import_kwh", 11), ("voltage_l1_v", 200), ("current_l1_a", 202)]}
    prof = MeterProfile(name="t", vendor="v", model="m", document="d", max_gap=8, points=pts)
    assert [(b.start, b.count) for b in plan_blocks(prof)] == [(0, 2), (11, 2), (200, 4)]
    prof = MeterProfile(name="t", vendor="v", model="m", document="d", max_gap=8, max_block=3, points=pts)
    assert [(b.start, b.count) for b in plan_blocks(prof)] == [(0, 2), (11, 2), (200, 2), (202, 2)]
    prof = MeterProfile(name="t", vendor="v", model="m", document="d", max_gap=10, points=pts)
    assert [(b.start, b.count) for b in plan_blocks(prof)] == [(0, 13), (200, 4)]


def test_decode_block_applies_scale_and_order():
    prof = load_profile("schneider-iem3000")
    (block,) = plan_blocks(prof, ["energy_import_kwh"])
    regs = codec.encode(123_456_789, "i64") + [0] * (block.count - 4)
    assert decode_block(prof, block, regs)["energy_import_kwh"] == pytest.approx(123456.789)
    assert prof.counter_step_kwh() == pytest.approx(0.001)


def test_unsigned_integer_counter_rollover_is_derived():
    pts = {"energy_import_kwh": {"address": 0, "function": "input", "type": "u32", "scale": 0.01}}
    prof = MeterProfile(name="t", vendor="v", model="m", document="d", points=pts)
    assert prof.counter_rollover_kwh() == pytest.approx(2**32 * 0.01)


def test_default_node_map_states():
    nm = load_nodemap("opc40502")
    assert nm.state_of({"channel_status": 0, "program_status": 1, "operation_mode": 0}) == "processing"
    assert nm.state_of({"channel_status": 0, "program_status": 0, "operation_mode": 2}) == "setup"
    assert nm.state_of({"channel_status": 1, "program_status": 3}) == "interrupted"
    assert nm.state_of({"channel_status": 2, "program_status": 0, "operation_mode": 0}) == "ready"
    assert nm.state_of({}) == "ready"


def test_a_copy_keeping_a_builtin_name_is_refused(tmp_path):
    # Records say which map decoded them by name: a copy with a changed address under the
    # built-in's name would pass for the original.
    from energy_agent.core.errors import ConfigError
    from energy_agent.drivers.nodemap import NODEMAP_DIR

    text = (PROFILE_DIR / "eastron-sdm630.yaml").read_text()
    (tmp_path / "my-sdm.yaml").write_text(text.replace("max_gap: 0 ", "max_gap: 4 "))
    with pytest.raises(ConfigError) as err:
        load_profile("my-sdm.yaml", tmp_path)
    assert str(err.value) == ("meter profile my-sdm.yaml: name 'eastron-sdm630' is a built-in profile's; "
                              "give your copy its own name")
    (tmp_path / "my-sdm.yaml").write_text(text.replace("name: eastron-sdm630", "name: my-sdm"))
    assert load_profile("my-sdm.yaml", tmp_path).name == "my-sdm"
    # the built-in file itself, given by its path, is the built-in
    assert load_profile(str(PROFILE_DIR / "eastron-sdm630.yaml")) is load_profile("eastron-sdm630")

    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "cnc.yaml").write_text((NODEMAP_DIR / "opc40502.yaml").read_text())
    with pytest.raises(ConfigError, match=r"^node map maps/cnc.yaml: name 'opc40502' is a built-in node map's; "
                                          "give your copy its own name$"):
        load_nodemap("maps/cnc.yaml", tmp_path)
