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


def test_sdm630_reads_energy_quantities_in_one_request():
    prof = load_profile("eastron-sdm630")
    blocks = plan_blocks(prof, ["power_w", "energy_import_kwh"])
    assert [(b.function, b.start, b.count) for b in blocks] == [("input", 52, 22)]


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
