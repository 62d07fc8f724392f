"""Job and state tracking from CNC snapshots and meter samples (no protocols involved)."""

import math

import pytest

from energy_agent.core.reading import Reading
from energy_agent.domain.spans import FinishedJob
from energy_agent.domain.tracker import MachineTracker
from energy_agent.drivers.nodemap import load_nodemap

PROCESSING = {"channel_status": 0, "program_status": 1, "operation_mode": 0}
SETUP = {"channel_status": 0, "program_status": 0, "operation_mode": 2}
IDLE = {"channel_status": 2, "program_status": 0, "operation_mode": 0}


class Plant:
    """Feeds a tracker: a meter at constant power per segment, sampled every second."""

    def __init__(self, **kw):
        self.jobs, self.intervals = [], []
        kw.setdefault("max_gap_s", 5.0)
        kw.setdefault("close_timeout_s", 10.0)
        self.tr = MachineTracker("m1", load_nodemap("opc40502").rules, on_finished=self._finished, **kw)
        self.t = 0.0
        self.e = 100.0
        self.p = 1000.0

    def _finished(self, span):
        (self.jobs if isinstance(span, FinishedJob) else self.intervals).append(span)

    def cnc(self, t, **values):
        self.tr.on_cnc(Reading("cnc", t, 1_800_000_000.0 + t, values))

    def run_to(self, t_end, p=None):
        """Advance the meter to t_end with samples every second at power p (from now on)."""
        if p is not None:
            self.p = p
        while self.t + 1.0 <= t_end + 1e-9:
            self.t += 1.0
            self.e += self.p * 1.0 / 3.6e6
            self.tr.on_meter(Reading("pm", self.t, 1_800_000_000.0 + self.t,
                                     {"power_w": self.p, "energy_import_kwh": self.e}))


def snapshot(state, **kw):
    v = {"program": "", "job_id": "", "parts_total": 0}
    v.update(state)
    v.update(kw)
    return v


def test_back_to_back_jobs_split_exactly_at_the_boundary():
    pl = Plant()
    pl.run_to(3)
    pl.cnc(3.5, **snapshot(PROCESSING, job_id="J1", program="O1"))
    pl.run_to(10, p=6000.0)
    pl.cnc(10.5, **snapshot(PROCESSING, job_id="J2", program="O1", parts_total=1))
    pl.run_to(20)
    pl.cnc(20.5, **snapshot(IDLE, program="O1", parts_total=2))
    pl.run_to(25, p=1000.0)
    assert [j.info.key for j in pl.jobs] == ["J1", "J2"]
    j1, j2 = pl.jobs
    assert (j1.info.start, j1.end, j1.end_reason, j1.parts) == (3.5, 10.5, "parts_counter", 1)
    assert (j2.info.start, j2.end, j2.end_reason, j2.parts) == (10.5, 20.5, "parts_counter", 1)
    # The meter steps its power at whole seconds (3 -> 6 kW over (3, 4], back to 1 kW over
    # (20, 21]); the CNC changes at half seconds. Inside an interval that spans a state change
    # the step model weights each side by its own sample's power (ready at 1 kW, processing at
    # 6 kW), so (3, 4] gives J1 6000 J * 3000/3500; (10, 11] is one state and splits by time;
    # (20, 21] gives J2 1000 J * 3000/3500. Exact to rounding.
    j1_ws = 6000 * 3000 / 3500 + 6000 * 6 + 3000
    j2_ws = 3000 + 6000 * 9 + 1000 * 3000 / 3500
    assert j1.energy.kwh == pytest.approx(j1_ws / 3.6e6, rel=1e-9)
    assert j2.energy.kwh == pytest.approx(j2_ws / 3.6e6, rel=1e-9)
    assert j1.energy.method == "counter" and j1.energy.coverage == 1.0


def test_late_job_id_rekeys_the_program_job():
    pl = Plant()
    pl.run_to(2)
    pl.cnc(2.5, **snapshot(PROCESSING, program="O7"))
    pl.run_to(4)
    pl.cnc(4.2, **snapshot(PROCESSING, program="O7", job_id="J7"))
    pl.run_to(6)
    assert pl.tr.open.key == "J7" and pl.tr.open.key_point == "job_id" and pl.tr.open.start == 2.5
    assert pl.jobs == []


def test_program_job_ends_on_return_to_idle():
    pl = Plant()
    pl.run_to(1)
    pl.cnc(1.0, **snapshot(SETUP, program="O9"))
    pl.run_to(5)
    pl.cnc(5.0, **snapshot(PROCESSING, program="O9"))
    pl.run_to(9)
    pl.cnc(9.0, **snapshot(IDLE, program="O9"))
    pl.run_to(12)
    (job,) = pl.jobs
    assert (job.info.key, job.end_reason, job.info.start, job.end) == ("O9", "idle", 1.0, 9.0)
    by_state = dict(zip(("off", "standby", "ready", "processing", "interrupted", "setup"), job.energy.kwh_by_state))
    assert by_state["setup"] == pytest.approx(1000 * 4 / 3.6e6)
    assert by_state["processing"] == pytest.approx(1000 * 4 / 3.6e6)


def test_job_id_job_survives_an_interruption_and_ends_when_cleared():
    pl = Plant()
    pl.cnc(0.5, **snapshot(IDLE))
    pl.run_to(2)
    pl.cnc(2.0, **snapshot(PROCESSING, job_id="J1", program="O1"))
    pl.run_to(4)
    pl.cnc(4.0, **snapshot({"channel_status": 1, "program_status": 3}, job_id="J1", program="O1"))
    pl.run_to(6)
    pl.cnc(6.0, **snapshot(PROCESSING, job_id="J1", program="O1"))
    pl.run_to(8)
    pl.cnc(8.0, **snapshot(IDLE, program="O1"))
    pl.run_to(10)
    (job,) = pl.jobs
    assert job.end_reason == "key_cleared" and job.info.program == "O1"
    assert job.energy.kwh_by_state[4] == pytest.approx(1000 * 2 / 3.6e6)  # interrupted
    assert "started_before_agent" not in job.flags


def test_a_job_end_seen_in_two_halves_records_one_job_not_a_second_empty_one():
    # A job's end read in two halves at one instant: first the parts counter and the cleared
    # job id with the state of before (processing, the program still loaded), then the idle
    # state, stamped with the same instant. The first half alone looks like a program job
    # starting; it ends where it began and must not become a record.
    pl = Plant()
    pl.run_to(1)
    pl.cnc(1.5, **snapshot(PROCESSING, job_id="J4", program="O3", parts_total=5))
    pl.run_to(6)
    pl.cnc(6.5, **snapshot(PROCESSING, program="O3", parts_total=6))
    pl.cnc(6.5, **snapshot(IDLE, program="O3", parts_total=6))
    pl.run_to(12)
    pl.cnc(12.5, **snapshot(PROCESSING, program="O3", parts_total=6))  # a real program job after it
    pl.run_to(15)
    pl.cnc(15.5, **snapshot(IDLE, program="O3", parts_total=6))
    pl.run_to(18)
    assert [(j.info.key, j.info.start, j.end, j.end_reason) for j in pl.jobs] == [
        ("J4", 1.5, 6.5, "parts_counter"), ("O3", 12.5, 15.5, "idle")]
    assert pl.jobs[0].parts == 1


def test_job_running_when_the_agent_starts_is_flagged():
    pl = Plant()
    pl.run_to(1)
    pl.cnc(1.5, **snapshot(PROCESSING, job_id="J0"))
    pl.run_to(3)
    pl.cnc(3.5, **snapshot(IDLE))
    pl.run_to(5)
    assert "started_before_agent" in pl.jobs[0].flags


def test_job_waits_for_a_meter_sample_after_its_end_then_times_out():
    pl = Plant(close_timeout_s=3.0)
    pl.cnc(0.5, **snapshot(IDLE))
    pl.run_to(2)
    pl.cnc(2.0, **snapshot(PROCESSING, job_id="J1"))
    pl.run_to(5)
    pl.cnc(5.5, **snapshot(IDLE))
    pl.tr.tick(6.0)  # no meter sample after 5.5 yet: still waiting
    assert pl.jobs == [] and len(pl.tr.ending) == 1
    pl.tr.tick(8.6)  # meter silent past the close timeout: computed with what there is
    (job,) = pl.jobs
    assert "no_meter_sample_after_end" in job.flags and "incomplete_coverage" in job.flags
    assert job.energy.coverage == pytest.approx(3.0 / 3.5)


def test_power_refines_ready_into_standby_and_off():
    pl = Plant(standby_below_w=500.0, off_below_w=20.0)
    pl.cnc(0.5, **snapshot(IDLE))
    pl.run_to(2, p=300.0)
    assert pl.tr.state == "standby"
    pl.run_to(3, p=5.0)
    assert pl.tr.state == "off"
    pl.run_to(4, p=1200.0)
    assert pl.tr.state == "ready"


def test_meter_outage_flags_the_job_and_nan_power_is_not_a_sample():
    pl = Plant()
    pl.cnc(0.5, **snapshot(IDLE))
    pl.run_to(2)
    pl.cnc(2.0, **snapshot(PROCESSING, job_id="J1"))
    pl.run_to(3)
    pl.tr.on_meter(Reading("pm", 3.5, 0.0, error="timeout"))
    pl.tr.on_meter(Reading("pm", 3.7, 0.0, {"power_w": math.nan}, bad=("power_w",)))
    pl.run_to(6)
    pl.cnc(6.0, **snapshot(IDLE))
    pl.run_to(8)
    (job,) = pl.jobs
    assert "meter_unavailable" in job.flags and job.bad_samples == 2
    assert job.energy.coverage == 1.0  # the counter spans the silent second


def test_idle_time_is_recorded_every_interval_and_the_buffers_stay_bounded():
    """Between jobs the machine's energy is recorded in idle intervals cut at multiples of
    interval_s (wall time); the samples kept never exceed one interval's worth."""
    pl = Plant(interval_s=600.0)
    pl.cnc(0.5, **snapshot(IDLE))
    pl.run_to(5000)
    assert len(pl.tr.samples) <= 600 + 2 and pl.tr.timeline.n <= 2
    assert not pl.jobs and [iv.kind for iv in pl.intervals] == ["idle"] * 8
    assert [iv.end for iv in pl.intervals] == [600.0 * k for k in range(1, 9)]  # wall 1_800_000_000 is a multiple
    assert pl.intervals[0].start == 0.5 and all(a.end == b.start for a, b in zip(pl.intervals, pl.intervals[1:]))
    # 1 kW throughout: each full interval holds exactly 600 s of it (counter deltas, exact to rounding).
    assert all(iv.energy.kwh == pytest.approx(1000 * 600 / 3.6e6, rel=1e-9) for iv in pl.intervals[1:])
    assert all(iv.energy.method == "counter" and iv.parts == 0 for iv in pl.intervals)


def test_job_start_stamped_before_the_latest_meter_sample_keeps_full_coverage():
    # J-A ends at 899.5; the meter sample at 900 finishes it and the buffers are trimmed. J-B's
    # start is stamped at the CNC's instant, 899.8, but arrives late, after the samples up to
    # 902: the sample before 899.8 must still be there (found by the simulators with jobs 2 s
    # apart: J-B's record lost 0.3 s of coverage at its start).
    pl = Plant()
    pl.cnc(0.5, **snapshot(IDLE))
    pl.run_to(800)
    pl.cnc(800.0, **snapshot(PROCESSING, job_id="J-A"))
    pl.run_to(899)
    pl.cnc(899.5, **snapshot(IDLE))
    pl.run_to(902)
    assert [j.info.key for j in pl.jobs] == ["J-A"]
    pl.cnc(899.8, **snapshot(PROCESSING, job_id="J-B"))
    pl.run_to(950)
    pl.cnc(950.0, **snapshot(IDLE))
    pl.run_to(952)
    job = pl.jobs[1]
    assert job.energy.coverage == 1.0 and job.energy.gap_count == 0 and "incomplete_coverage" not in job.flags
    assert job.energy.kwh == pytest.approx(1000 * 50.2 / 3.6e6, rel=1e-9)


def test_state_timeline_orders_late_changes():
    from energy_agent.domain.samples import StateTimeline

    tl = StateTimeline(capacity=2)
    assert tl.append(1.0, 2) and not tl.append(2.0, 2)
    assert tl.append(5.0, 1)          # power drops below standby at a meter sample
    assert tl.append(4.5, 3)          # a CNC change stamped earlier arrives later
    t, s = tl.view()
    assert list(t) == [1.0, 4.5, 5.0] and list(s[:2]) == [2, 3]
    assert tl.append(4.5, 4) and tl.state_at(4.7) == 4  # same instant: the latest state wins
    assert tl.state_at(0.0) == 2 and tl.state_at(10.0) == int(s[2])


def test_back_to_back_jobs_in_different_states_add_up_to_the_counter():
    """The second job's first interval starts before it, in the first job's state: trimming the
    buffers after the first job must keep that state, or the step model turns into a ramp and
    the two jobs no longer add up to the counter delta."""
    pl = Plant()
    pl.run_to(3)
    pl.cnc(3.5, **snapshot(PROCESSING, job_id="J1", program="O1"))
    pl.run_to(10, p=6000.0)
    pl.cnc(10.5, **snapshot(SETUP, job_id="J2", program="O2"))
    pl.run_to(20, p=2000.0)
    pl.cnc(20.5, **snapshot(IDLE, program=""))
    pl.run_to(25, p=1000.0)
    j1, j2 = pl.jobs
    # Meter: 1 kW to t=3, 6 kW over (3, 10], 2 kW over (10, 20], 1 kW after. Step model at the
    # state changes: (3, 4] gives J1 6000 * 3000/3500 W s; (10, 11] splits its 2000 W s as
    # 6000 * 0.5 : 2000 * 0.5, J1 1500 and J2 500; (20, 21] splits its 1000 W s as
    # 2000 * 0.5 : 1000 * 0.5, J2 1000 * 1000/1500.
    j1_ws = 6000 * 3000 / 3500 + 6000 * 6 + 1500
    j2_ws = 500 + 2000 * 9 + 1000 * 1000 / 1500
    assert j1.energy.kwh == pytest.approx(j1_ws / 3.6e6, rel=1e-9)
    assert j2.energy.kwh == pytest.approx(j2_ws / 3.6e6, rel=1e-9)
