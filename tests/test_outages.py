"""What the tracker records around outages (docs/EVIDENCE.md, "Outages"), each rule against the
closed-form truth of a plant fed in process (no protocols): a job is never invented, never
merged with others, a boundary that was not observed says so, and the energy of time in which
jobs could not be observed is recorded apart."""

from __future__ import annotations

import math

import pytest

from energy_agent.core.reading import Reading
from energy_agent.domain.spans import FinishedInterval, FinishedJob
from energy_agent.domain.tracker import MachineTracker
from energy_agent.drivers.nodemap import load_nodemap

WALL0 = 1_800_000_000.0  # a multiple of 3600: periods fall on plant seconds that are multiples of 3600
POINTS = ("channel_status", "program_status", "operation_mode", "program", "job_id", "parts_total")
RUNNING = {"channel_status": 0, "program_status": 1, "operation_mode": 0}
IDLE = {"channel_status": 2, "program_status": 0, "operation_mode": 0}
TOL_KWH = 1e-9
"""Counter deltas of an exact float64 counter: the spans' energy is exact to rounding."""


class Plant:
    """A machine whose true power is constant within each whole second (``run_to(t, p)`` sets
    it from now on), metered every second by an exact counter, and whose CNC is read as the
    OPC UA driver hands it over: one reading per instant, each value with the time the CNC
    stamped on it. The CNC changes on whole seconds, where the power steps: every span's
    counter delta is then exactly the truth (the power model is not needed)."""

    def __init__(self, **kw):
        self.spans: list = []
        kw.setdefault("max_gap_s", 5.0)
        kw.setdefault("close_timeout_s", 10.0)
        self.tr = MachineTracker("m1", load_nodemap("opc40502").rules, on_finished=self.spans.append, **kw)
        self.t, self.e, self.p = 0.0, 1000.0, 1000.0
        self.values: dict = {"program": "", "job_id": "", "parts_total": 0, **IDLE}
        self.stamps: dict[str, float] = dict.fromkeys(POINTS, WALL0)
        self.meter_up = True
        self.counter = True
        self.segments: list[tuple[float, float, float]] = []  # (from, to, W): the truth
        self.tr.on_meter(Reading("pm", 0.0, WALL0, {"power_w": self.p, "energy_import_kwh": self.e}))

    # --- the machine

    def change(self, t: float, observed: bool = True, **values) -> None:
        """The CNC changes ``values`` at t (stamping them); the tracker sees it when observed."""
        self.run_to(t)
        for q, v in values.items():
            if self.values.get(q) != v:
                self.stamps[q] = WALL0 + t
            self.values[q] = v
        if observed:
            self.tr.on_cnc(Reading("cnc", t, WALL0 + t, dict(self.values), stamps=dict(self.stamps)))

    def lose(self, t: float) -> None:
        self.run_to(t)
        self.tr.on_cnc(Reading("cnc", t, WALL0 + t, error="connection lost"))

    def reconnect(self, t: float) -> None:
        """The driver's first snapshot of a new connection: every value, stamped at receipt,
        with the CNC's stamps of the values."""
        self.run_to(t)
        self.tr.on_cnc(Reading("cnc", t, WALL0 + t, dict(self.values), stamps=dict(self.stamps), initial=True))

    def run_to(self, t_end: float, p: float | None = None, *, counter_frozen: bool = False) -> None:
        if p is not None:
            self.p = p
        while self.t + 1.0 <= t_end + 1e-9:
            self.segments.append((self.t, self.t + 1.0, self.p))
            self.t += 1.0
            self.e += self.p / 3.6e6
            if self.meter_up:
                e = self.frozen_at if counter_frozen else self.e if self.counter else math.nan
                self.tr.on_meter(Reading("pm", self.t, WALL0 + self.t, {"power_w": self.p, "energy_import_kwh": e}))
            self.tr.tick(self.t)

    def truth(self, a: float, b: float) -> float:
        """kWh the machine used in [a, b] (power is constant within each whole second)."""
        return sum(p * max(0.0, min(b, t1) - max(a, t0)) for t0, t1, p in self.segments) / 3.6e6

    # --- what came out

    @property
    def jobs(self) -> list[FinishedJob]:
        return [s for s in self.spans if isinstance(s, FinishedJob)]

    @property
    def intervals(self) -> list[FinishedInterval]:
        return [s for s in self.spans if isinstance(s, FinishedInterval)]

    def ordered(self) -> list:
        return sorted(self.spans, key=lambda s: s.info.start if isinstance(s, FinishedJob) else s.start)


def bounds(span) -> tuple[float, float]:
    return (span.info.start, span.end) if isinstance(span, FinishedJob) else (span.start, span.end)


def assert_tiles(pl: Plant) -> None:
    """The spans tile the machine's time from the first observation, and their energy adds up
    to the meter's over the same time."""
    spans = pl.ordered()
    for a, b in zip(spans, spans[1:]):
        assert bounds(a)[1] == pytest.approx(bounds(b)[0], abs=1e-9), (a, b)
    first, last = bounds(spans[0])[0], bounds(spans[-1])[1]
    total = sum(s.energy.kwh for s in spans)
    assert total == pytest.approx(pl.truth(first, last), abs=1e-6)


def start_job(pl: Plant, t: float, job: str, parts: int) -> None:
    pl.change(t, job_id=job, program="O1", parts_total=parts, **RUNNING)


def end_job(pl: Plant, t: float, parts: int) -> None:
    pl.change(t, job_id="", program="", parts_total=parts, **IDLE)


def test_outage_in_which_nothing_changed_leaves_the_job_whole_and_flagged():
    pl = Plant()
    pl.change(0)
    pl.run_to(10, p=1000.0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(20, p=6000.0)
    pl.lose(20)
    pl.run_to(60)
    pl.reconnect(60)  # same values, same stamps: the job went on
    pl.run_to(80)
    end_job(pl, 80, 1)
    pl.run_to(90, p=1000.0)
    (job,) = pl.jobs
    assert (job.info.start, job.end, job.end_reason, job.parts) == (10, 80, "parts_counter", 1)
    assert job.info.start_basis == job.end_basis == "observed"
    assert "cnc_unavailable" in job.flags
    assert job.energy.kwh == pytest.approx(pl.truth(10, 80), abs=TOL_KWH)
    assert [(iv.kind, iv.start, iv.end) for iv in pl.intervals] == [("idle", 0, 10)]  # the one after is open
    assert_tiles(pl)


def test_job_ended_and_another_began_during_a_server_restart_invents_no_job():
    """The case an independent test found: a job ends while the OPC UA server is down; the
    restarted server shows each value with the stamp of its last change. One record per job,
    each boundary where the CNC stamped it."""
    pl = Plant()
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(30, p=6000.0)
    pl.lose(30)
    pl.change(40, observed=False, job_id="", program="", parts_total=1, **IDLE)
    pl.run_to(50, p=1000.0)
    pl.change(50, observed=False, job_id="J2", program="O1", **RUNNING)
    pl.run_to(70, p=5000.0)
    pl.reconnect(70)
    pl.run_to(90)
    end_job(pl, 90, 2)
    pl.run_to(100, p=1000.0)
    j1, j2 = pl.jobs
    assert [j.info.key for j in pl.jobs] == ["J1", "J2"]  # no third, invented job
    assert (j1.end, j1.end_reason, j1.end_basis, j1.parts) == (40, "parts_counter", "source_timestamp", 1)
    assert (j2.info.start, j2.info.start_basis, j2.end) == (50, "source_timestamp", 90)
    assert j1.energy.kwh == pytest.approx(pl.truth(10, 40), abs=TOL_KWH)
    assert j2.energy.kwh == pytest.approx(pl.truth(50, 90), abs=TOL_KWH)
    gap = next(iv for iv in pl.intervals if iv.start == 40)
    assert gap.kind == "idle" and gap.end == 50 and "inferred_from_cnc_timestamps" in gap.flags
    assert_tiles(pl)


def test_jobs_that_ran_unobserved_are_never_merged_into_the_open_one():
    """The CNC is away for a long stretch in which two whole jobs ran: the job open before it
    ends where it was last seen (estimated, with the window), the stretch is an unobserved
    interval with the meter's energy and the parts counted, and the job running when the CNC
    is back starts where it stamped its key."""
    pl = Plant()
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(30, p=6000.0)
    pl.lose(30)
    for k, (a, b) in enumerate([(40, 100), (120, 200)], start=1):
        pl.change(a - 10, observed=False, job_id="", program="", parts_total=k, **IDLE)
        pl.run_to(a, p=1000.0)
        pl.change(a, observed=False, job_id=f"U{k}", program="O1", **RUNNING)
        pl.run_to(b, p=7000.0)
    pl.change(210, observed=False, job_id="", program="", parts_total=3, **IDLE)
    pl.run_to(220, p=1000.0)
    pl.change(220, observed=False, job_id="J4", program="O1", **RUNNING)
    pl.run_to(240, p=5000.0)
    pl.reconnect(240)
    pl.run_to(260)
    end_job(pl, 260, 4)
    pl.run_to(270, p=1000.0)
    j1, j4 = pl.jobs
    assert (j1.info.key, j4.info.key) == ("J1", "J4")
    assert (j1.end, j1.end_basis, j1.end_reason, j1.parts) == (30, "estimated", "observation_lost", None)
    assert "between" in j1.end_note and "cnc_unavailable" in j1.flags
    assert j1.energy.kwh == pytest.approx(pl.truth(10, 30), abs=TOL_KWH)
    (gap,) = [iv for iv in pl.intervals if iv.kind == "unobserved"]
    assert (gap.start, gap.end, gap.reason, gap.parts) == (30, 220, "cnc_unavailable", 3)
    assert gap.energy.kwh == pytest.approx(pl.truth(30, 220), abs=TOL_KWH)  # the meter's, not a job's
    assert (j4.info.start, j4.info.start_basis, j4.parts) == (220, "source_timestamp", 1)
    assert_tiles(pl)


def test_a_bad_job_or_state_signal_is_an_outage_and_an_uncertain_one_a_flag():
    pl = Plant()
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(20, p=6000.0)
    # channel_status goes Bad: the state cannot be known; the serial going Uncertain is only flagged.
    pl.tr.on_cnc(Reading("cnc", 20, WALL0 + 20, {k: v for k, v in pl.values.items() if k != "channel_status"},
                         bad=("channel_status",), reasons={"channel_status": "bad_status"}, stamps=dict(pl.stamps)))
    pl.run_to(40)
    pl.change(40)  # Good again, nothing changed meanwhile: the job went on
    pl.tr.on_cnc(Reading("cnc", 45, WALL0 + 45, dict(pl.values), bad=("job_id",),
                         reasons={"job_id": "uncertain_status"}, stamps=dict(pl.stamps)))
    pl.run_to(60)
    end_job(pl, 60, 1)
    pl.run_to(70, p=1000.0)
    (job,) = pl.jobs
    assert (job.info.start, job.end) == (10, 60)
    assert {"cnc_bad_status", "cnc_uncertain_status"} <= set(job.flags)
    assert_tiles(pl)


def test_an_outage_longer_than_outage_close_s_is_settled_without_waiting():
    pl = Plant(outage_close_s=100.0, interval_s=3600.0)
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(20, p=6000.0)
    pl.lose(20)
    pl.run_to(200)
    (job,) = pl.jobs  # recorded while the CNC is still away
    assert (job.end, job.end_basis, job.end_reason) == (20, "estimated", "observation_lost")
    pl.reconnect(300)  # the same job still shows: it is recorded anew from now, not merged
    pl.run_to(320)
    end_job(pl, 320, 1)
    pl.run_to(330, p=1000.0)
    j1, j1b = pl.jobs
    assert (j1b.info.key, j1b.info.start, j1b.info.start_basis) == ("J1", 300, "estimated")
    (gap,) = [iv for iv in pl.intervals if iv.kind == "unobserved"]
    assert (gap.start, gap.end) == (20, 300)
    assert_tiles(pl)


def test_unobserved_time_is_cut_into_periods_and_its_parts_come_with_the_last_piece():
    pl = Plant(outage_close_s=60.0, interval_s=600.0)
    pl.change(0)
    pl.lose(100)
    pl.change(700, observed=False, job_id="", program="", parts_total=2)
    pl.run_to(1400)
    pl.reconnect(1400)
    pl.run_to(1500)
    unobserved = [iv for iv in pl.intervals if iv.kind == "unobserved"]
    assert [(iv.start, iv.end) for iv in unobserved] == [(100, 600.0), (600.0, 1200.0), (1200.0, 1400)]
    assert [iv.parts for iv in unobserved] == [None, None, 2]
    assert_tiles(pl)


def test_a_frozen_counter_is_flagged_and_its_span_integrated_from_power():
    """The counter stops moving while the power reads 22 kW: its readings from the last move
    on are not energy; the job's energy comes from power integration there (estimated) and
    stays within the power model's truth, instead of reading low."""
    pl = Plant(stale_min_s=30.0, counter_step_kwh=0.001)
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(100, p=22000.0)
    pl.frozen_at = pl.e
    pl.run_to(300, counter_frozen=True)
    pl.run_to(400)  # the counter moves again (with all it missed)
    end_job(pl, 400, 1)
    pl.run_to(410, p=1000.0)
    (job,) = pl.jobs
    assert "counter_stale" in job.flags and "estimated_energy" in job.flags
    truth = pl.truth(10, 400)
    assert job.energy.kwh == pytest.approx(truth, rel=1e-9)  # constant power: trapezoids are exact
    assert job.energy.estimated_kwh == pytest.approx(pl.truth(100, 301), rel=1e-6)
    assert job.energy.method == "mixed"


def test_a_counter_that_moves_in_coarse_steps_is_not_called_stale():
    """An integer kWh register moves once every 164 s at 22 kW: no false alarm."""
    pl = Plant(stale_min_s=30.0, counter_step_kwh=1.0)
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(100, p=22000.0)
    pl.frozen_at = math.floor(pl.e)
    for _ in range(6):  # the register shows whole kWh
        target = pl.t + 60
        while pl.t < target:
            pl.frozen_at = math.floor(pl.e)
            pl.run_to(pl.t + 1, counter_frozen=True)
    end_job(pl, pl.t + 0, 1)
    pl.run_to(pl.t + 10, p=1000.0)
    (job,) = pl.jobs
    assert "counter_stale" not in job.flags


def test_a_job_without_any_meter_reading_has_unknown_energy_not_zero():
    """A power-only meter (no counter) silent for the whole job: nothing measured the job, so
    its record says unknown with the reason, never 0 kWh."""
    pl = Plant()
    pl.counter = False
    pl.change(0)
    pl.run_to(10)
    pl.meter_up = False
    start_job(pl, 10, "J1", 0)
    pl.run_to(30, p=6000.0)
    end_job(pl, 30, 1)
    pl.run_to(40)
    pl.meter_up = True
    pl.run_to(60)
    (job,) = pl.jobs
    assert job.energy.method == "none" and job.energy.coverage == 0.0
    from energy_agent.bridge.lineproto import record_line
    from energy_agent.records.record import build
    from tests import factories

    rec = build(site="s", agent="a", seq=1, prev_hash="0" * 64, span=job,
                factor=factories.FACTOR.as_factor("vn"), meter=factories.METER.as_ref("p"), cnc=None,
                config_hash="c" * 64)
    assert rec.energy.kwh is None and rec.emissions.kgco2e is None and rec.energy.by_state is None
    assert rec.energy.unknown_reason == "no usable counter or power reading covers the window"
    assert "kwh" not in record_line(rec).decode().split(" ")[1].split(",")[0]  # no kwh field in the point
    assert "unknown_reason=" in record_line(rec).decode()


def test_a_state_change_while_unobserved_does_not_end_the_job():
    """The job is interrupted while the CNC is away and still interrupted when it is back: the
    same job goes on (job rules end it on key or parts, not on a state), its new state placed
    at the CNC's stamp, flagged states_estimated."""
    pl = Plant()
    pl.change(0)
    start_job(pl, 10, "J1", 0)
    pl.run_to(20, p=6000.0)
    pl.lose(20)
    pl.change(30, observed=False, channel_status=1)  # interrupted
    pl.run_to(40, p=1500.0)
    pl.reconnect(40)
    pl.run_to(50)
    end_job(pl, 50, 1)
    pl.run_to(60, p=1000.0)
    (job,) = pl.jobs
    assert (job.info.start, job.end, job.end_reason) == (10, 50, "parts_counter")
    assert {"cnc_unavailable", "states_estimated"} <= set(job.flags)
    assert job.energy.kwh == pytest.approx(pl.truth(10, 50), abs=TOL_KWH)
    interrupted = job.energy.kwh_by_state[4]  # interrupted from the stamp at 30 on
    assert interrupted == pytest.approx(pl.truth(30, 50), abs=TOL_KWH)
    assert_tiles(pl)
