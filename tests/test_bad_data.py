"""Bad meter data never becomes energy: every fault kind through the real agent.

One plant run serves two meters behind one RTU-over-TCP gateway port (the simulators' Modbus
server behind their corrupting proxy): m1's Eastron SDM630 (float32 kWh counter) has one job per
fault kind, with the fault inside the job; m2's Schneider iEM3000 (int64 Wh counter) on the
same connection is healthy throughout. The whole agent (drivers, trackers, kernel, ledger in
tmp_path) runs on the scenario clock against the simulators' OPC UA CNCs. Each test then
checks one fault kind's job record against the closed-form truth, the quality flag it must
carry, that nothing bad became energy, and the log lines of its outage; m2's jobs must be as
clean as without any fault. A second, smaller test damages frames on a plain TCP connection
(cut frames, short answers), and a third feeds a flapping device to the outage log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import pytest
import yaml

from energy_agent.app import config
from energy_agent.app.demo import tolerance_kwh
from energy_agent.app.runtime import Agent
from energy_agent.core.clock import Clock
from energy_agent.core.errors import ConfigError
from energy_agent.core.reading import Availability, Reading
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import load_profile
from energy_agent.records.ledger import Ledger
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank
from energy_agent.simulators.meter import MeterBank
from energy_agent.simulators.plant import DEMO_SCENARIO
from energy_agent.simulators.services import free_port

SPEED = 30.0
POLL_S = 1.5  # meter poll interval, plant seconds (50 ms real)
MAX_GAP_S = 12.0  # plant seconds: a silent m1 holds the shared line 0.1 s real (3 s) per poll at most
LEAD_S = 90.0  # first job: the agent is connected by then
JOB_S, IDLE_S = 90.0, 25.0
A, B = 30.0, 60.0  # the fault window inside each m1 job, seconds after its start

FLAPS = [{"kind": "modbus_exception", "from": A + 4 * k, "to": A + 4 * k + 2} for k in range(8)]
CASES: dict[str, list[dict]] = {
    # case: faults of m1 relative to its job's start ("from"/"to" default to A/B; to None: an event)
    "exception": [{"kind": "modbus_exception", "code": 11}],
    "silent": [{"kind": "meter_silent"}],
    "bad_crc": [{"kind": "modbus_garbled", "mode": "corrupt"}],
    "short": [{"kind": "modbus_garbled", "mode": "short"}],
    "flapping": FLAPS,
    "power_nan": [{"kind": "power_nan"}],
    "power_inf": [{"kind": "power_inf"}],
    "power_negative": [{"kind": "power_negative"}],
    # Implausible power while the counter is unreadable too: the power fallback is needed and
    # must refuse the implausible part (a gap), not integrate it.
    "power_implausible": [{"kind": "counter_nan", "from": A - 15, "to": B + 15},
                          {"kind": "power_implausible"}],
    "counter_nan": [{"kind": "counter_nan"}],
    "counter_back": [{"kind": "counter_jump", "kwh": -3.0, "to": None}],
    "counter_forward": [{"kind": "counter_jump", "kwh": 500.0}],  # +500 kWh until B, then back
}
OUTAGE = {  # case: (flag on the job, subjects of its outage log lines)
    "exception": ("meter_unavailable", [None]),
    "silent": ("meter_unavailable", [None]),
    "bad_crc": ("meter_unavailable", [None]),
    "short": ("meter_unavailable", [None]),
    "flapping": ("meter_unavailable", [None]),
    "power_nan": ("power_w_nan", ["power_w"]),
    "power_inf": ("power_w_inf", ["power_w"]),
    "power_negative": ("power_w_negative", ["power_w"]),
    "power_implausible": ("power_w_implausible", ["power_w", "energy_import_kwh"]),
    "counter_nan": ("energy_import_kwh_nan", ["energy_import_kwh"]),
}
COUNTER_EVENTS = {  # case: (flags, resets, jumps, counter log lines)
    "counter_back": ({"counter_reset"}, 1, 0, ["went back"]),
    "counter_forward": ({"counter_jump", "counter_reset"}, 1, 1, ["jumped", "went back"]),
}


def _scenario() -> scn.Scenario:
    data = yaml.safe_load(DEMO_SCENARIO.read_text())
    m1, m2 = data["machines"]
    m1["jobs"], m2["jobs"], faults = [], [], []
    start = LEAD_S
    for k, (case, fs) in enumerate(CASES.items()):
        m1["jobs"].append({"job_id": f"B-{k:02d}-{case}", "program": "O1001", "parts": 1, "start_s": start,
                           "phases": [["processing", JOB_S]]})
        for f in fs:
            rel = {"from": A, "to": B, **f}
            fault = {"machine": "m1", "from_s": start + rel.pop("from"), **rel}
            to = fault.pop("to")
            if to is not None:
                fault["to_s"] = start + to
            faults.append(fault)
        start += JOB_S + IDLE_S
    end = start
    t, k = LEAD_S + 5.0, 0
    while t + 60.0 < end:  # m2: long healthy jobs over the same time
        length = min(260.0, end - t - 10.0)
        m2["jobs"].append({"job_id": f"H-{k}", "program": "P201", "parts": 1, "start_s": t,
                           "phases": [["setup", 20.0], ["processing", length - 20.0]]})
        t += length + 15.0
        k += 1
    data.update(name="bad-data", speed=SPEED, duration_s=end + 30.0, faults=faults)
    return scn.parse(data)


SCENARIO = _scenario()


class _Lines(logging.Handler):
    """Every log line of the run, with its scenario time."""

    def __init__(self, anchor: float):
        super().__init__(logging.INFO)
        self.anchor = anchor
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(((record.created - self.anchor) * SPEED, record.getMessage()))


def _plant_config(tmp_path, modbus_port: int, opcua_port: int, anchor: float) -> dict:
    endpoint = f"opc.tcp://127.0.0.1:{opcua_port}"
    meter = {"host": "127.0.0.1", "port": modbus_port, "transport": "rtu-over-tcp", "poll_interval_s": POLL_S,
             "timeout_s": 0.1, "retries": 0}
    return {
        "site": "test-site", "agent_id": "gw-bad",
        "clock": {"speed": SPEED, "anchor": datetime.fromtimestamp(anchor, timezone.utc).isoformat()},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "emission_factors": {"vn-2023": {"value": 0.6592, "authority": "MONRE DCC", "document": "notice",
                                         "region": "VN", "year": 2023, "basis": "location"}},
        "meters": [{"id": "pm-1", "unit_id": 1, "profile": "eastron-sdm630", **meter},
                   {"id": "pm-2", "unit_id": 2, "profile": "schneider-iem3000", **meter}],
        "cncs": [{"id": f"cnc-{i}", "endpoint": endpoint, "interval_s": POLL_S,
                  "params": {"namespace": SCENARIO.namespace, "channel": f"M{i}.Channel_1", "job": f"M{i}.Job"}}
                 for i in (1, 2)],
        "machines": [{"id": f"m{i}", "meter": f"pm-{i}", "cnc": f"cnc-{i}", "emission_factor": "vn-2023",
                      "max_gap_s": MAX_GAP_S} for i in (1, 2)],
    }


class _Stalls:
    """When the test's event loop, which also serves the simulated meters, was blocked: lateness
    of a 10 ms sleep, each span longer than ``limit`` s kept as (plant start, plant end). Alone,
    the worst lateness of a run is ~10 ms."""

    def __init__(self, anchor: float, limit: float):
        self.anchor, self.limit = anchor, limit
        self.spans: list[tuple[float, float]] = []
        self.worst = 0.0

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            late = time.monotonic() - t - 0.01
            self.worst = max(self.worst, late)
            if late > self.limit:
                now = time.time()
                self.spans.append(((now - late - self.anchor) * SPEED, (now - self.anchor) * SPEED))


# The meters answer from this test's event loop. When that loop is blocked for about the
# poll timeout (0.1 s), a request in flight times out: an outage the scenario did not plan, with
# its flag on a job and two log lines. Measured: 20 blocks of 0.15 s in one run made pm-2 miss
# a reading in one of two runs. Such a run does not test the agent (the simulated meter broke
# its own timing), so it is run again, once.
STALL_S = 0.05


@pytest.fixture(scope="module")
async def run(tmp_path_factory):
    """The plant run: records by job id, the truth by job id, the log lines, the proxy's count.
    Run again once if the test's own loop stalled (``STALL_S``); a second stall fails."""
    for _ in range(2):
        result, stalls = await _plant_run(tmp_path_factory)
        if not stalls.spans:
            return result
        warnings.warn(f"plant run redone: the test's event loop was blocked for up to {stalls.worst:.3f} s "
                      f"at plant seconds {[(round(a), round(b)) for a, b in stalls.spans]}")
    pytest.fail(f"the test's event loop, which serves the simulated meters, was blocked for more than "
                f"{STALL_S} s in both runs (last run, plant seconds: {stalls.spans}; worst "
                f"{stalls.worst:.3f} s): the meters could not answer within their timeout")


async def _plant_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad-data")
    anchor = float(math.ceil(time.time()) + 4)  # whole seconds: the config's ISO anchor is exact
    clock = Clock(SPEED, anchor)
    cncs = CncBank(SCENARIO, clock, port=free_port())
    meters = MeterBank(SCENARIO, clock, port=free_port(), framer="rtu-over-tcp")
    await cncs.start()
    await meters.start()
    lines = _Lines(anchor)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(lines)
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(_plant_config(tmp_path, meters.port, cncs.port, anchor)))
    agent = Agent(config.load(path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    stalls = _Stalls(anchor, STALL_S)
    watcher = asyncio.create_task(stalls.watch(stop))
    truth = {j["job_id"]: j for j in scn.truth(SCENARIO)}
    try:
        deadline = time.monotonic() + (anchor - time.time()) + SCENARIO.duration_s / SPEED + 30.0
        while agent.stats.jobs < len(truth) or clock.wall() - anchor < SCENARIO.duration_s:
            assert not task.done(), "the agent stopped by itself"
            assert time.monotonic() < deadline, f"{agent.stats.jobs} of {len(truth)} job records"
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await task
        await watcher
        root.removeHandler(lines)
        root.setLevel(level)
        await meters.stop()
        await cncs.stop()
    ledger = Ledger(tmp_path / "ledger.db")
    records = [r.to_json() for r in ledger.records()]  # the records' JSON form: the contract
    ledger.close_sync()
    jobs = [r for r in records if "job" in r]
    return {"records": {r["job"]["job_id"]: r for r in jobs}, "n_records": len(jobs), "truth": truth,
            "lines": lines.lines, "damaged": meters.proxy.damaged}, stalls


def _job(case: str) -> str:
    return f"B-{list(CASES).index(case):02d}-{case}"


def _step(job: dict) -> float:
    """The SDM630 float32 register's step at the job's counter value (kWh)."""
    return float(np.spacing(np.float32(job["counter_end_kwh"])))


def _outage_lines(run, case: str) -> list[str]:
    """pm-1's outage lines and m1's counter lines logged between this job's start and the next."""
    t = run["truth"][_job(case)]
    lo, hi = t["start_s"], t["end_s"] + IDLE_S
    return [msg for s, msg in run["lines"] if lo <= s < hi and (msg.startswith("meter pm-1:")
                                                                 or msg.startswith("machine m1:"))]


def _healthy_counter_job(run, case: str) -> dict:
    """The record of a case whose energy the counter measures through the fault: checked
    within max(0.1 %, 2 register steps) of the truth, with no energy from power integration."""
    t, r = run["truth"][_job(case)], run["records"][_job(case)]
    assert [f["kind"] for f in t["faults"]] == [f["kind"] for f in CASES[case]]  # the truth names the fault
    tol = tolerance_kwh("eastron-sdm630", t["counter_end_kwh"], t["kwh"])
    assert abs(r["energy"]["kwh"] - t["kwh"]) <= tol, (case, r["energy"], t["kwh"], tol)
    assert r["energy"]["method"] == "counter" and r["energy"]["estimated_kwh"] == 0.0
    assert r["quality"]["coverage"] == 1.0
    assert r["quality"]["counter_resets"] == 0 and r["quality"]["counter_jumps"] == 0
    return r


def _one_outage(run, case: str) -> None:
    """Exactly one 'unavailable' and one 'back' line per subject of the outage, nothing more."""
    lines = _outage_lines(run, case)
    for subject in OUTAGE[case][1]:
        who = "meter pm-1:" if subject is None else f"meter pm-1: {subject}"
        down = [m for m in lines if m.startswith(f"{who} unavailable")]
        back = [m for m in lines if m.startswith(f"{who} back after")]
        assert len(down) == 1 and len(back) == 1, (case, lines)
    assert len(lines) == 2 * len(OUTAGE[case][1]), (case, lines)


# ------------------------------------------------------------------------------ the run


def test_every_job_recorded_and_the_healthy_meter_unaffected(run):
    assert run["n_records"] == len(run["records"]) == len(run["truth"])
    healthy = [t for t in run["truth"].values() if t["machine"] == "m2"]
    assert len(healthy) >= 4
    for t in healthy:
        r = run["records"][t["job_id"]]
        assert t["faults"] == []
        tol = tolerance_kwh("schneider-iem3000", t["counter_end_kwh"], t["kwh"])
        assert abs(r["energy"]["kwh"] - t["kwh"]) <= tol, (t["job_id"], r["energy"]["kwh"], t["kwh"], tol)
        assert r["energy"]["method"] == "counter" and r["energy"]["estimated_kwh"] == 0.0
        q = r["quality"]
        assert q["flags"] == [] and q["coverage"] == 1.0 and q["gap_count"] == 0 and q["bad_samples"] == 0, q
    assert not [m for _, m in run["lines"] if m.startswith(("meter pm-2:", "machine m2:"))]
    # m1's jobs between the fault windows lead no line of their own: every pm-1 line is a case's.
    lines = [m for _, m in run["lines"] if m.startswith(("meter pm-1:", "machine m1:"))]
    assert len(lines) == sum(2 * len(s) for _, s in OUTAGE.values()) + sum(
        len(c[3]) for c in COUNTER_EVENTS.values()), lines


@pytest.mark.parametrize("case", ["exception", "silent", "bad_crc", "short", "flapping"])
def test_no_answer_is_a_gap_the_counter_bridges(run, case):
    # Exception code 11, timeouts, frames with a wrong CRC (dropped: a timeout) or with half
    # the registers: no sample while they last. The counter delta across is still measured
    # energy; the gap (longer than max_gap_s, except between flaps) is counted.
    r = _healthy_counter_job(run, case)
    q = r["quality"]
    assert "meter_unavailable" in q["flags"] and q["bad_samples"] >= 1, q
    if case != "flapping":
        assert q["gap_count"] >= 1 and q["longest_gap_s"] >= (B - A) - 2 * POLL_S, q
    else:
        assert q["bad_samples"] >= len(FLAPS) // 2, q
    _one_outage(run, case)
    if case in ("bad_crc", "short"):
        assert run["damaged"] > 0


@pytest.mark.parametrize("case", ["power_nan", "power_inf", "power_negative"])
def test_unusable_power_is_flagged_and_not_used(run, case):
    # NaN, +Inf and negative power (a reversed CT) are named in Reading.bad: the power of those
    # samples is absent, the counter goes on measuring; the job carries a flag per kind.
    r = _healthy_counter_job(run, case)
    q = r["quality"]
    assert OUTAGE[case][0] in q["flags"] and q["bad_samples"] >= (B - A) / POLL_S / 2, q
    assert q["gap_count"] == 0
    _one_outage(run, case)


def test_implausible_power_is_not_integrated(run):
    # Counter unreadable over [A-15, B+15), power above max_power_w (2 x 300 kW) in [A, B):
    # the power fallback covers the parts with plausible power and leaves the implausible part
    # a gap (30 s, longer than max_gap_s). Integrated, 600 kW over 30 s would add 5 kWh.
    case = "power_implausible"
    t, r = run["truth"][_job(case)], run["records"][_job(case)]
    q, en = r["quality"], r["energy"]
    assert {"power_w_implausible", "energy_import_kwh_nan", "incomplete_coverage", "estimated_energy"} <= set(
        q["flags"]), q
    implausible = next(f for f in t["faults"] if f["kind"] == "power_implausible")
    counted = t["kwh"] - implausible["energy_kwh"]  # the truth outside the window left uncovered
    # Tolerance: 4 register steps (two counter stretches, each known to a step at both ends),
    # 1 % of the power-integrated part (trapezoid of sampled power; the simulated ripple and
    # the sampling instants are far inside that), and one poll interval of processing power
    # at each edge of the gap (the gap runs from the last to the first plausible sample).
    edge = 2 * POLL_S * 9000.0 * 1.04 / 3.6e6
    tol = 4 * _step(t) + 0.01 * en["estimated_kwh"] + edge
    assert abs(en["kwh"] - counted) <= tol, (en, counted, tol)
    assert en["kwh"] <= t["kwh"] + 4 * _step(t)  # never more than what was used
    assert en["method"] == "mixed" and q["gap_count"] >= 1 and q["coverage"] < 1.0
    assert q["longest_gap_s"] >= (B - A) - 2 * POLL_S
    _one_outage(run, case)


def test_unreadable_counter_falls_back_to_power(run):
    case = "counter_nan"
    t, r = run["truth"][_job(case)], run["records"][_job(case)]
    q, en = r["quality"], r["energy"]
    assert {"energy_import_kwh_nan", "estimated_energy"} <= set(q["flags"]) and q["coverage"] == 1.0, q
    # Tolerance: 4 register steps (the counter before and after) + 1 % of the estimated part.
    tol = 4 * _step(t) + 0.01 * en["estimated_kwh"]
    assert abs(en["kwh"] - t["kwh"]) <= tol, (en, t["kwh"], tol)
    assert en["method"] == "mixed" and en["estimated_kwh"] >= 0.8 * t["faults"][0]["energy_kwh"]
    _one_outage(run, case)


@pytest.mark.parametrize("case", ["counter_back", "counter_forward"])
def test_counter_jumps_are_counted_never_energy(run, case):
    # -3 kWh from A on (a reset to a lower value), or +500 kWh in [A, B) (then back): the
    # intervals holding a step are taken from power (estimated), the step itself is nowhere.
    flags, resets, jumps, logged = COUNTER_EVENTS[case]
    t, r = run["truth"][_job(case)], run["records"][_job(case)]
    q, en = r["quality"], r["energy"]
    assert flags | {"estimated_energy"} <= set(q["flags"]), q
    assert q["counter_resets"] == resets and q["counter_jumps"] == jumps, q
    assert q["coverage"] == 1.0 and q["gap_count"] == 0
    # Tolerance: 2 register steps per counter stretch (one more per step) + 1 % of the
    # power-integrated intervals (one poll interval per step).
    tol = 2 * _step(t) * (1 + resets + jumps) + 0.01 * en["estimated_kwh"]
    assert abs(en["kwh"] - t["kwh"]) <= tol, (en, t["kwh"], tol)
    assert 0 < en["estimated_kwh"] <= (resets + jumps) * 2 * POLL_S * 9000 * 1.04 / 3.6e6
    lines = _outage_lines(run, case)
    assert len(lines) == len(logged) and all(w in m for w, m in zip(logged, lines)), lines


# ------------------------------------------------------------------------------ plain TCP


class _ManualClock:
    """Scenario time set by the test; the driver's monotonic stamps are real seconds."""

    def __init__(self, t: float):
        self.anchor, self.t, self.speed = 1_790_000_000.0, t, 1.0

    def wall(self) -> float:
        return self.anchor + self.t

    def mono(self) -> float:
        return time.monotonic()

    def wall_of_mono(self, mono: float) -> float:
        return self.wall()


@pytest.mark.parametrize("mode", ["corrupt", "short"])
async def test_damaged_tcp_frames_fail_one_poll_and_disturb_no_other_unit(mode):
    # A cut MBAP frame (the client waits for a byte that never comes) or a short answer: m1's
    # poll fails, m2's on the same connection right after it reads the exact register, and so
    # does m1's once the window is over. Nothing of the damaged frame is read as an answer.
    demo = scn.load(DEMO_SCENARIO)
    s = demo.with_faults([{"machine": "m1", "kind": "modbus_garbled", "from_s": 100, "to_s": 200, "mode": mode}])
    clock = _ManualClock(150.0)
    bank = MeterBank(s, clock, port=free_port(), framer="tcp")
    await bank.start()
    bus = ModbusBus("127.0.0.1", bank.port, timeout_s=0.3)
    drivers = {m.id: MeterDriver(f"pm-{m.id}", m.meter.unit_id, load_profile(m.meter.profile), bus, clock,
                                 timeout_s=0.3, retries=0) for m in s.machines}
    try:
        for _ in range(2):
            r1 = await drivers["m1"].poll()
            want = "no answer within" if mode == "corrupt" else "short response"
            assert not r1.ok and want in r1.error and not r1.values, r1
            r2 = await drivers["m2"].poll()
            assert r2.ok and r2.bad == (), r2
            e2 = scn.energy_at(s.machine("m2"), clock.t)
            assert r2.values["energy_import_kwh"] == pytest.approx(math.floor(e2 * 1000) / 1000, abs=1e-12)
        assert bank.proxy.damaged == 2
        clock.t = 200.0
        r1 = await drivers["m1"].poll()
        assert r1.ok and r1.values["energy_import_kwh"] == float(np.float32(scn.energy_at(s.machine("m1"), 200.0)))
    finally:
        await bus.close()
        await bank.stop()


# ------------------------------------------------------------------------------ the outage log


def test_a_flapping_device_logs_one_outage():
    av = Availability("meter pm-9", back_after=3)
    lines = []
    pattern = "xoxoxooxoxxooxoooooo"  # x: no answer; o: answered. Never 3 answers in a row until the end.
    for k, c in enumerate(pattern):
        r = Reading("pm-9", k, k, {"power_w": 1.0}) if c == "o" else Reading("pm-9", k, k, error="timeout")
        lines += av.update(r, float(k))
    assert lines == [(logging.WARNING, "meter pm-9: unavailable (timeout)"),
                     (logging.INFO, "meter pm-9: back after 14.0 s (7 failed readings)")]
    assert av.down == []
    # A quantity's outage: only readings that answered count; its own lines.
    lines = []
    for k, bad in enumerate([False, True, None, True, False, False, False]):
        if bad is None:
            r = Reading("pm-9", k, k, error="timeout")
        elif bad:
            r = Reading("pm-9", k, k, {}, ("power_w",), reasons={"power_w": "implausible"})
        else:
            r = Reading("pm-9", k, k, {"power_w": 1.0})
        lines += av.update(r, float(k))
    assert [m for _, m in lines] == ["meter pm-9: power_w unavailable (above the profile's max_power_w)",
                                    "meter pm-9: unavailable (timeout)",
                                    "meter pm-9: back after 1.0 s (1 failed readings)",
                                    "meter pm-9: power_w back after 3.0 s (2 failed readings)"]


# ------------------------------------------------------------------------------ scenario fields


@pytest.mark.parametrize("fault, message", [
    ({"kind": "counter_jump", "from_s": 1}, "faults[0].kwh: counter_jump needs a finite, non-zero step"),
    ({"kind": "counter_jump", "from_s": 1, "kwh": 0}, "faults[0].kwh: counter_jump needs a finite, non-zero step"),
    ({"kind": "power_nan", "from_s": 1, "to_s": 2, "kwh": 5}, "faults[0].kwh: only counter_jump takes a kwh"),
    ({"kind": "meter_silent", "from_s": 1, "to_s": 2, "mode": "short"},
     "faults[0].mode: only modbus_garbled takes a mode"),
    ({"kind": "modbus_garbled", "from_s": 1, "to_s": 2, "mode": "noisy"}, "faults[0].mode"),
    ({"kind": "power_inf", "from_s": 1}, "faults[0].to_s: power_inf needs an end"),
    ({"kind": "power_negative", "from_s": 1, "to_s": 2, "value_w": 5},
     "faults[0].value_w: only power_implausible takes a value_w"),
])
def test_new_fault_fields_are_validated(fault, message):
    data = yaml.safe_load(DEMO_SCENARIO.read_text())
    data["faults"] = [{"machine": "m1", **fault}]
    with pytest.raises(ConfigError) as err:
        scn.parse(data)
    assert message in str(err.value), str(err.value)


def test_truth_names_the_faulty_windows_with_their_true_energy():
    t = {j["job_id"]: j for j in scn.truth(SCENARIO)}
    back = t[_job("counter_back")]["faults"]
    assert back == [{"kind": "counter_jump", "device": "meter", "from_s": back[0]["from_s"],
                     "to_s": back[0]["from_s"], "energy_kwh": 0.0, "kwh": -3.0}]
    fwd = t[_job("counter_forward")]
    (f,) = fwd["faults"]
    m1 = SCENARIO.machine("m1")
    assert (f["from_s"], f["to_s"]) == (fwd["start_s"] + A, fwd["start_s"] + B)
    assert f["energy_kwh"] == pytest.approx(scn.energy_at(m1, f["to_s"]) - scn.energy_at(m1, f["from_s"]), abs=1e-9)
