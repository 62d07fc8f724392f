"""The raw-sample archive and ``energy-agent replay``.

Frames round-trip bit for bit; torn and altered frames are found and never crash the reader;
jobs tracked from readings (in process, and by the agent against the simulators) replay to
records identical to the ledger's, and a changed frame or a changed ledger value is reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from energy_agent.core import states
from energy_agent.core.reading import Reading
from energy_agent.core.record import JobRecord, canonical_json
from energy_agent.domain import energy
from energy_agent.domain.energy import compute_job
from energy_agent.domain.spans import FinishedJob
from energy_agent.domain.tracker import MachineTracker
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.records import archive, record, replay
from energy_agent.records.ledger import Ledger
from energy_agent.simulators.plant import DEMO_SCENARIO, PlantRun
from tests import factories

ROOT = Path(__file__).resolve().parents[1]
PROCESSING = {"channel_status": 0, "program_status": 1, "operation_mode": 0}
SETUP = {"channel_status": 0, "program_status": 0, "operation_mode": 2}
IDLE = {"channel_status": 2, "program_status": 0, "operation_mode": 0}
WALL0 = factories.T0


def _bits(a: np.ndarray) -> bytes:
    return np.asarray(a).tobytes()


def _inputs(rng: np.random.Generator, n: int = 50) -> archive.JobInputs:
    t = np.cumsum(rng.uniform(0.5, 1.5, n)) + 1000.0
    p = rng.uniform(500.0, 9000.0, n)
    e = 100.0 + np.cumsum(p) / 3.6e6
    e[n // 3] = np.nan  # an unreadable counter
    p[n // 2] = np.nan  # an unreadable power
    st_t = np.sort(rng.uniform(t[0], t[-1], 4))
    st_s = rng.integers(0, len(states.STATES), 4).astype(np.uint8)
    return archive.JobInputs(t, e, p, st_t, st_s, float(t[2]) + 0.25, float(t[-3]) + 0.5, 5.0, 0.0, 20000.0,
                             np.array([t[5] + 0.1]), ("meter_unavailable", "started_before_agent"))


def _frame(rng: np.random.Generator, rid: str | None = None, machine: str = "m1", n: int = 50) -> archive.Frame:
    x = _inputs(rng, n)
    return archive.Frame(rid or rng.bytes(16).hex(), machine, "J-ü1", WALL0, WALL0 + x.t1 - x.t0, x,
                         compute_job(*x.args()))


def _same(a: archive.Frame, b: archive.Frame) -> None:
    assert (a.record_id, a.machine, a.key) == (b.record_id, b.machine, b.key)
    assert struct.pack("<2d", a.start_wall, a.end_wall) == struct.pack("<2d", b.start_wall, b.end_wall)
    for name in ("t", "e", "p", "st_t", "st_s", "bad_t"):
        assert _bits(getattr(a.inputs, name)) == _bits(getattr(b.inputs, name)), name
    fa, fb = a.inputs, b.inputs
    assert struct.pack("<5d", fa.t0, fa.t1, fa.max_gap_s, fa.rollover_kwh, fa.max_power_w) == \
        struct.pack("<5d", fb.t0, fb.t1, fb.max_gap_s, fb.rollover_kwh, fb.max_power_w)
    assert fa.flags == fb.flags
    assert replay.compare_result(a, b.result) == []


# ---------------------------------------------------------------------------- frames


def test_frames_round_trip_bit_for_bit(tmp_path):
    rng = np.random.default_rng(7)
    frames = [_frame(rng, n=n) for n in (8, 50, 400)]
    empty = archive.JobInputs(*(np.empty(0),) * 3, np.array([5.0]), np.array([2], np.uint8), 10.0, 20.0, 5.0,
                              0.0, 0.0, np.empty(0), ())  # a job without a single meter sample
    frames.append(archive.Frame("0" * 32, "m1", "J-0", WALL0, WALL0 + 10.0, empty, compute_job(*empty.args())))
    path = tmp_path / "m1" / "2026-09-21.frames"
    for f in frames:
        archive.append(path, archive.encode(f))
    assert path.stat().st_mode & 0o777 == 0o600
    items = [item for _, item in archive.scan(path)]
    assert all(isinstance(i, archive.Frame) for i in items), items
    assert len(items) == len(frames)
    for a, b in zip(frames, items):
        _same(a, b)
        assert np.isnan(b.inputs.e).sum() == np.isnan(a.inputs.e).sum()  # NaN survives
        # The kernel on the decoded inputs gives the stored result, bit for bit.
        assert replay.compare_result(b, replay.recompute(b)) == []


def test_a_torn_tail_is_reported_at_every_cut_and_earlier_frames_still_read(tmp_path):
    rng = np.random.default_rng(11)
    frames = [_frame(rng, n=8) for _ in range(3)]
    whole = b"".join(archive.encode(f) for f in frames)
    last = len(archive.encode(frames[2]))
    start = len(whole) - last
    for cut in range(start + 1, len(whole)):  # every way the last write can have been cut short
        path = tmp_path / f"cut{cut}.frames"
        path.write_bytes(whole[:cut])
        items = [item for _, item in archive.scan(path)]
        assert [type(i).__name__ for i in items] == ["Frame", "Frame", "Problem"], cut
        assert items[2].kind == "torn" and items[2].offset == start, (cut, items[2])
        _same(items[0], frames[0])
        _same(items[1], frames[1])


def test_a_torn_frame_followed_by_a_restarted_writers_frames_is_skipped(tmp_path):
    rng = np.random.default_rng(12)
    a, b, c = (archive.encode(_frame(rng, n=8)) for _ in range(3))
    for cut in (3, archive.HEADER.size - 1, archive.HEADER.size + 5, len(b) - 1):
        path = tmp_path / f"restart{cut}.frames"
        path.write_bytes(a + b[:cut] + c)  # killed in the middle of b; the next run appended c
        items = [item for _, item in archive.scan(path)]
        assert [type(i).__name__ for i in items] == ["Frame", "Problem", "Frame"], (cut, items)
        assert items[1].kind == "torn" and items[1].offset == len(a)


def test_an_altered_frame_is_corrupt_and_the_next_one_still_reads(tmp_path):
    rng = np.random.default_rng(13)
    frames = [_frame(rng, n=8) for _ in range(3)]
    data = bytearray(b"".join(archive.encode(f) for f in frames))
    first = len(archive.encode(frames[0]))
    data[first + archive.HEADER.size + 100] ^= 0x01  # one bit of the second frame's payload
    path = tmp_path / "flip.frames"
    path.write_bytes(bytes(data))
    items = [item for _, item in archive.scan(path)]
    assert [type(i).__name__ for i in items] == ["Frame", "Problem", "Frame"]
    assert items[1].kind == "corrupt" and "CRC" in items[1].detail
    _same(items[2], frames[2])


def test_the_writer_logs_a_failure_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the archive folder should be")
    w = archive.ArchiveWriter(blocker)
    job = factories.finished_job()  # built without captured inputs
    with caplog.at_level(logging.ERROR, logger="energy_agent.records.archive"):
        for i in range(3):
            w.submit(f"{i:032x}", job)
        w.close()
    assert w.written == 0
    errors = [r for r in caplog.records if "cannot append the frame" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------- tracked jobs, in process


class Feed:
    """A tracker fed with readings: counter (float32 resolution), power, faults on demand."""

    def __init__(self):
        self.jobs = []
        self.tr = MachineTracker("m1", load_nodemap("opc40502").rules, max_gap_s=5.0, close_timeout_s=10.0,
                                 rollover_kwh=0.0, max_power_w=20000.0, on_finished=self._finished)
        self.t, self.e, self.p = 0.0, 12345.6, 1000.0
        self.rng = np.random.default_rng(3)

    def _finished(self, span):
        if isinstance(span, FinishedJob):
            self.jobs.append(span)

    def cnc(self, dt: float, state: dict, **values):
        v = {"program": "", "job_id": "", "parts_total": 0, **state, **values}
        self.tr.on_cnc(Reading("cnc", self.t + dt, WALL0 + self.t + dt, v))

    def run(self, seconds: float, p: float, *, power_nan: bool = False, silent: bool = False):
        self.p = p
        end = self.t + seconds
        while self.t + 1.0 <= end + 1e-9:
            self.t += 1.0 + self.rng.uniform(-0.05, 0.05)
            w = self.p * (1.0 + self.rng.uniform(-0.02, 0.02))
            self.e += w / 3.6e6
            if silent:
                self.tr.on_meter(Reading("pm", self.t, WALL0 + self.t, error="timeout"))
                continue
            values = {"energy_import_kwh": float(np.float32(self.e))}
            if not power_nan:
                values["power_w"] = w
            self.tr.on_meter(Reading("pm", self.t, WALL0 + self.t, values))


def _tracked_jobs():
    f = Feed()
    f.run(20, 1000.0)
    f.cnc(0.4, SETUP, job_id="J1", program="O1", serial="S1")
    f.run(30, 2600.0)
    f.cnc(0.3, PROCESSING, job_id="J1", program="O1", serial="S1")
    f.run(60, 9000.0)
    f.run(20, 9000.0, power_nan=True)  # counter without power: time weights
    f.cnc(0.6, PROCESSING, job_id="J2", program="O1", serial="S2", parts_total=1)  # back to back
    f.run(40, 9000.0)
    f.run(12, 9000.0, silent=True)  # a gap the counter bridges; meter_unavailable, bad samples
    f.run(30, 8000.0)
    f.cnc(0.2, IDLE, program="O1", parts_total=2)
    f.run(20, 1000.0)
    return f.jobs


async def _ledger_and_archive(tmp_path, jobs):
    ledger = Ledger(tmp_path / "ledger.db")
    writer = archive.ArchiveWriter(tmp_path / "archive")
    for job in jobs:
        rec = await ledger.append(job.machine, lambda seq, prev, job=job: record.build(
            site="plant", agent="gw", seq=seq, prev_hash=prev, span=job, factor=factories.FACTOR.as_factor("vn-2023"),
            meter=factories.METER.as_ref("eastron-sdm630"), cnc=None, config_hash="c" * 64))
        writer.submit(rec.record_id, job)
    writer.close()
    await ledger.close()
    assert writer.written == len(jobs)
    led = Ledger(tmp_path / "ledger.db")
    recs = led.records()
    led.close_sync()
    return recs


async def test_tracked_jobs_replay_identical_and_a_change_is_a_difference(tmp_path):
    jobs = _tracked_jobs()
    assert [j.info.key for j in jobs] == ["J1", "J2"]
    assert all(j.inputs is not None for j in jobs)
    assert "meter_unavailable" in jobs[1].flags and jobs[1].bad_samples > 0 and jobs[1].energy.gap_count > 0
    recs = await _ledger_and_archive(tmp_path, jobs)

    rep = replay.replay(tmp_path / "archive", recs)
    assert (rep.replayed, rep.identical, rep.differences, rep.problems) == (2, 2, [], [])
    assert not rep.without_frame and not rep.without_record and rep.ok

    # The ledger's kWh moved by one unit of its last digit: a difference, both values shown.
    changed = [factories.edited(recs[0], lambda d: d["energy"].update(kwh=round(d["energy"]["kwh"] + 1e-9, 9))),
               *recs[1:]]
    rep = replay.replay(tmp_path / "archive", changed)
    assert not rep.ok and rep.identical == 1 and rep.differing == {recs[0].record_id}
    fields = {d.field: d for d in rep.differences}
    assert set(fields) == {"energy.kwh"}, fields  # its hash still covers the original value, as rebuilt
    d = fields["energy.kwh"]
    assert d.against == "ledger" and json.loads(d.stored) == changed[0].energy.kwh
    assert json.loads(d.replayed) == recs[0].energy.kwh

    # A record the archive does not know, and a frame the ledger does not know.
    rep = replay.replay(tmp_path / "archive", recs[1:])
    assert rep.identical == 1 and [f.record_id for f in rep.without_record] == [recs[0].record_id]


async def test_a_changed_sample_in_a_frame_is_a_difference(tmp_path):
    jobs = _tracked_jobs()
    recs = await _ledger_and_archive(tmp_path, jobs)
    (path,) = archive.files(tmp_path / "archive")
    frames = [item for _, item in archive.scan(path)]
    x = frames[0].inputs
    k = int(np.searchsorted(x.t, 0.5 * (x.t0 + x.t1)))
    e = x.e.copy()
    e[k:] += 0.002  # 2 Wh more from the middle of the job on
    forged = dataclasses.replace(frames[0], inputs=dataclasses.replace(x, e=e))
    path.write_bytes(b"".join(archive.encode(f) for f in [forged, *frames[1:]]))  # CRCs made to match

    rep = replay.replay(tmp_path / "archive", recs)
    assert rep.replayed == 2 and rep.identical == 1 and not rep.problems
    fields = {(d.against, d.field) for d in rep.differences}
    assert {("frame", "kernel.kwh"), ("ledger", "energy.kwh")} <= fields, fields


# ---------------------------------------------------------------------------- the agent, end to end


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "energy_agent", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory, mosquitto):
    """The demo plant at 60x with meter faults (a counter reset, NaN power, a silent meter),
    the agent as its own process with the archive on (the default)."""
    work = tmp_path_factory.mktemp("archive-plant")
    scenario = yaml.safe_load(DEMO_SCENARIO.read_text())
    scenario["speed"] = 60
    scenario["faults"] = [
        {"machine": "m1", "kind": "power_nan", "from_s": 800, "to_s": 900},
        {"machine": "m1", "kind": "counter_reset", "from_s": 1300},
        {"machine": "m2", "kind": "meter_silent", "from_s": 700, "to_s": 760},
    ]
    path = work / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    energy.warm_up()  # compile into numba's cache here, so the agent only loads it within the lead-in
    run = PlantRun(work, mosquitto.port, {}, scenario_path=path, lead_s=20.0)
    truth = run.truth()
    with run:
        run.start()

        def ledger_complete():
            if not (work / "ledger.db").exists():
                return None
            led = Ledger(work / "ledger.db")
            try:
                recs = led.records()
            finally:
                led.close_sync()
            return recs if sum(isinstance(r, JobRecord) for r in recs) >= len(truth) else None

        run.wait_until(ledger_complete, run.end_wall - time.time() + 60, f"{len(truth)} job records")
        codes = run.stop()
    led = Ledger(work / "ledger.db")
    try:
        records = led.records()  # jobs and the intervals between them, as the agent left them
    finally:
        led.close_sync()
    return {"work": work, "truth": truth, "records": records, "codes": codes}


def _replay_summary(out: str) -> dict[str, int]:
    line = out.strip().splitlines()[-1]
    assert line.startswith("replay: "), out
    words = line.replace(",", " ").replace(";", " ").split()
    return {"replayed": int(words[1]), "identical": int(words[words.index("identical") - 1]),
            "differing": int(words[words.index("differing") - 1])}


def test_agent_archives_every_job_and_replay_finds_them_identical(agent_run):
    work, records = agent_run["work"], agent_run["records"]
    assert agent_run["codes"]["agent"] == 0
    assert sum(isinstance(r, JobRecord) for r in records) == len(agent_run["truth"]) >= 6
    # Faults reached the records (how many depends on timing): more than plain counter deltas replayed.
    assert any(r.quality.bad_samples or r.quality.gap_count or r.quality.counter_resets for r in records)
    frames = [item for p in archive.files(work / "archive") for _, item in archive.scan(p)]
    assert all(isinstance(f, archive.Frame) for f in frames), frames
    assert sorted(f.record_id for f in frames) == sorted(r.record_id for r in records)

    out = _run(["replay", "-c", "plant.yaml", "--progress"], work)
    assert out.returncode == 0, out.stdout + out.stderr
    s = _replay_summary(out.stdout)
    assert s == {"replayed": len(records), "identical": len(records), "differing": 0}, out.stdout
    assert "0 records without a frame" in out.stdout and "0 torn" in out.stdout
    assert "replay [" in out.stderr and "100.0%" in out.stderr  # the bar, asked for with --progress

    out = _run(["replay", "-c", "plant.yaml", "--machine", "m2"], work)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # not a terminal: no bar
    m2 = sum(r.machine == "m2" for r in records)
    assert _replay_summary(out.stdout) == {"replayed": m2, "identical": m2, "differing": 0}


def _copy(agent_run, name: str) -> Path:
    """A copy of the run's ledger and archive with a config pointing at them."""
    src, dst = agent_run["work"], agent_run["work"] / name
    dst.mkdir()
    shutil.copy(src / "ledger.db", dst / "ledger.db")
    shutil.copytree(src / "archive", dst / "archive")
    cfg = yaml.safe_load((src / "plant.yaml").read_text())
    cfg["ledger"] = {"path": "ledger.db"}
    (dst / "plant.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_replay_reports_a_changed_ledger_energy(agent_run):
    work = _copy(agent_run, "ledger-changed")
    db = sqlite3.connect(work / "ledger.db")
    rid, body = next((rid, body) for rid, body in db.execute(
        "SELECT record_id, body FROM records WHERE machine='m2' ORDER BY seq") if 'job-record/' in body)
    rec = json.loads(body)
    old = rec["energy"]["by_state"]["processing"]
    rec["energy"]["by_state"]["processing"] = round(old + 1e-9, 9)
    db.execute("UPDATE records SET body=? WHERE record_id=?", (canonical_json(rec).decode(), rid))
    db.commit()
    db.close()
    out = _run(["replay", "-c", "plant.yaml"], work)
    assert out.returncode == 1, out.stdout + out.stderr
    n = len(agent_run["records"])
    assert _replay_summary(out.stdout) == {"replayed": n, "identical": n - 1, "differing": 1}
    line = next(x for x in out.stdout.splitlines() if "energy.by_state.processing" in x)
    assert rid in line and f"ledger {rec['energy']['by_state']['processing']!r}" in line and f"replay {old!r}" in line


def test_replay_reports_a_changed_frame_and_an_unreadable_one(agent_run):
    work = _copy(agent_run, "frame-changed")
    path = archive.files(work / "archive", "m1")[0]
    items = [item for _, item in archive.scan(path)]
    items.sort(key=lambda f: not f.key.startswith("J"))  # a job's frame first (intervals are archived too)
    x = items[0].inputs
    e = x.e.copy()
    e[int(np.searchsorted(x.t, 0.5 * (x.t0 + x.t1))):] += 0.002  # 2 Wh more from the middle of the job on
    forged = dataclasses.replace(items[0], inputs=dataclasses.replace(x, e=e))
    path.write_bytes(b"".join(archive.encode(f) for f in [forged, *items[1:]]))
    out = _run(["replay", "-c", "plant.yaml", "--machine", "m1"], work)
    assert out.returncode == 1, out.stdout
    assert _replay_summary(out.stdout)["differing"] == 1
    assert f"(record {items[0].record_id}): kernel." in out.stdout

    # The same file with one payload bit flipped and its CRC left alone: an unreadable frame.
    data = bytearray(path.read_bytes())
    data[archive.HEADER.size + 40] ^= 0x10
    path.write_bytes(bytes(data))
    out = _run(["replay", "-c", "plant.yaml", "--machine", "m1"], work)
    assert out.returncode == 1 and "CORRUPT" in out.stdout and "1 records without a frame" in out.stdout, out.stdout
