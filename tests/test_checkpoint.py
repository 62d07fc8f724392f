"""Open jobs survive a restart: tracker checkpoints through the real ledger, resumed by a new
tracker on a new monotonic axis, with the energy across the outage from the counter delta."""

import json

import pytest

from energy_agent.core.reading import Reading
from energy_agent.domain.spans import FinishedJob
from energy_agent.domain.tracker import MachineTracker
from energy_agent.drivers.nodemap import load_nodemap
from energy_agent.records.ledger import Ledger

PROCESSING = {"channel_status": 0, "program_status": 1, "operation_mode": 0, "program": "O1", "parts_total": 0}
WALL0 = 1_800_000_000.0


def stamped(at: float) -> dict[str, float]:
    """Every point's SourceTimestamp at plant second ``at``."""
    return dict.fromkeys(("channel_status", "program_status", "operation_mode", "program", "job_id", "parts_total"),
                         WALL0 + at)


class Meter:
    """Constant power per segment; counter exact (kWh)."""

    def __init__(self):
        self.t, self.e, self.p = 0.0, 500.0, 2000.0

    def advance(self, t_end: float, p: float | None = None):
        if p is not None:
            self.p = p
        self.e += self.p * (t_end - self.t) / 3.6e6
        self.t = t_end


def tracker(jobs, offset: float) -> MachineTracker:
    """A tracker whose monotonic clock is wall - WALL0 - offset (a new process: a new offset)."""
    return MachineTracker("m1", load_nodemap("opc40502").rules, max_gap_s=5.0, close_timeout_s=10.0,
                          on_finished=lambda span: jobs.append(span) if isinstance(span, FinishedJob) else None)


async def test_open_job_resumes_across_a_restart(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        jobs: list = []
        # First run: monotonic = wall - WALL0.
        wall_of = lambda m: m + WALL0  # noqa: E731
        tr, meter = tracker(jobs, 0.0), Meter()

        def sample(tr, t_mono, wall):
            tr.on_meter(Reading("pm", t_mono, wall, {"power_w": meter.p, "energy_import_kwh": meter.e}))

        for k in range(1, 11):  # 1 Hz at 2 kW, job J-9 from t = 4.5 s in processing at 8 kW
            meter.advance(float(k), 8000.0 if k > 5 else None)
            sample(tr, float(k), WALL0 + k)
            if k == 4:
                tr.on_cnc(Reading("cnc", 4.5, WALL0 + 4.5, dict(PROCESSING, job_id="J-9"), stamps=stamped(4.5)))
        body, rows, keep = tr.checkpoint(wall_of)
        assert body is not None and len(rows) == 10 and tr.checkpoint(wall_of)[1] == []  # only new samples
        await ledger.save_checkpoints([("m1", body, rows, keep)])
        # The process dies at t = 12 (samples 11, 12 never checkpointed); down until t = 60.
        saved = await ledger.load_checkpoints()
        b, r = saved["m1"]
        # Second run: another monotonic origin (the process started anew).
        jobs2: list = []
        tr2 = tracker(jobs2, 0.0)
        offset = 1000.0
        mono2 = lambda w: w - WALL0 + offset  # noqa: E731
        tr2.restore(b, r, mono2, now=mono2(WALL0 + 60))
        assert tr2.open is not None and tr2.open.key == "J-9" and tr2.open.start == pytest.approx(4.5 + offset)
        assert "resumed_after_restart" in tr2.open.flags
        # After the restart: the CNC still runs J-9 (every value still stamped with its original
        # instant: nothing changed), the meter goes on; the job ends at t = 80.5.
        tr2.on_cnc(Reading("cnc", mono2(WALL0 + 60), WALL0 + 60, dict(PROCESSING, job_id="J-9"), stamps=stamped(4.5),
                           initial=True))
        for k in range(60, 91):
            meter.advance(float(k))
            sample(tr2, mono2(WALL0 + k), WALL0 + k)
            if k == 80:
                tr2.on_cnc(Reading("cnc", mono2(WALL0 + 80.5), WALL0 + 80.5,
                                   dict(PROCESSING, channel_status=2, program_status=0, job_id="")))
        assert [j.info.key for j in jobs2] == ["J-9"]
        job = jobs2[0]
        # Truth: 2 kW over [4.5, 5], 8 kW over [5, 80.5].
        truth_kwh = (2000 * 0.5 + 8000 * 75.5) / 3.6e6
        assert job.energy.kwh == pytest.approx(truth_kwh, rel=1e-9)
        assert job.energy.method == "counter" and job.energy.estimated_kwh == 0
        assert job.energy.gap_count == 1 and job.energy.longest_gap_s == pytest.approx(50.0)  # 10 -> 60
        assert "resumed_after_restart" in job.flags
        assert job.info.start_wall == WALL0 + 4.5 and job.end_wall == WALL0 + 80.5
        # The machine's time goes on in an idle interval, which the next checkpoint holds.
        body = json.loads(tr2.checkpoint(lambda m: m - offset + WALL0)[0])
        assert body["open"] is None and body["interval"]["kind"] == "idle"
        assert body["interval"]["start_wall"] == WALL0 + 80.5
    finally:
        await ledger.close()


async def test_a_job_that_ended_during_the_outage_ends_at_the_cnc_instant(tmp_path):
    jobs: list = []
    tr, meter = tracker(jobs, 0.0), Meter()
    meter.p = 8000.0
    for k in range(0, 6):
        meter.advance(float(k))
        tr.on_meter(Reading("pm", float(k), WALL0 + k, {"power_w": meter.p, "energy_import_kwh": meter.e}))
        if k == 0:
            tr.on_cnc(Reading("cnc", 0.5, WALL0 + 0.5, dict(PROCESSING, job_id="J-1"), stamps=stamped(0.5)))
    body, rows, _ = tr.checkpoint(lambda m: m + WALL0)

    tr2 = tracker(jobs, 0.0)
    tr2.restore(json.loads(body), rows, lambda w: w - WALL0, now=30.0)
    # Down from 5 to 30; the job ended at 20: the CNC's first snapshot after the restart stamps
    # the job key's clearing (and the channel's reset) at 20, the parts counter did not move.
    # Power was 8 kW throughout, so the step model splits the counter delta exactly.
    meter.advance(30.0)
    tr2.on_meter(Reading("pm", 30.0, WALL0 + 30, {"power_w": meter.p, "energy_import_kwh": meter.e}))
    stamps = dict(stamped(0.5), job_id=WALL0 + 20, program=WALL0 + 20, channel_status=WALL0 + 20,
                  program_status=WALL0 + 20)
    tr2.on_cnc(Reading("cnc", 30.5, WALL0 + 30.5, dict(PROCESSING, channel_status=2, program_status=0, job_id="",
                                                        program=""), stamps=stamps, initial=True))
    meter.advance(31.0)
    tr2.on_meter(Reading("pm", 31.0, WALL0 + 31, {"power_w": meter.p, "energy_import_kwh": meter.e}))
    (job,) = jobs
    assert job.end == 20.0 and job.end_reason == "key_cleared" and job.end_basis == "source_timestamp"
    assert job.energy.kwh == pytest.approx(8000 * 19.5 / 3.6e6, rel=1e-9)
    assert "resumed_after_restart" in job.flags
