"""``energy-agent replay``: recompute every archived job and compare it with the ledger.

For each frame of the raw-sample archive (``energy_agent.records.archive``) the job's energy is computed
again by ``energy_agent.domain.energy.compute_job``, the function the tracker calls, from exactly the inputs
it received then. Two comparisons follow, both exact (a float equals only the same float):

- with the frame's own result, field by field of ``JobEnergy`` (the kernel's full precision);
- with the ledger's record: the record is built again by ``energy_agent.records.record.build`` from the
  recomputed energy, the frame's window and samples (duration, sample count, bad samples,
  median interval, flags) and the ledger record's identity (site, agent, seq, emission factor,
  meter, CNC, provenance), and every field is compared as canonical JSON, so two numbers are
  equal only when they are the same float. The rebuilt ``hash`` covers the rest.

A difference means a record, a frame or the kernel changed since the job was recorded. The
summary also counts frames without a record (e.g. pruned from the ledger), records without a
frame (the archive was off or its disk failed) and torn or corrupt frames.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from energy_agent.core.errors import RecordError
from energy_agent.core.record import IntervalRecord, JobRecord, JobRecordV1, Record, canonical_json
from energy_agent.domain.energy import JobEnergy, compute_job
from energy_agent.domain.spans import Finished, FinishedInterval, FinishedJob, JobInfo, span_flags
from energy_agent.records import archive, record

MISSING = "(missing)"


@dataclass
class Difference:
    machine: str
    key: str
    record_id: str
    field: str
    against: str
    """``ledger`` (the stored record) or ``frame`` (the agent's full-precision result)."""
    stored: str
    replayed: str

    def __str__(self) -> str:
        return (f"{self.machine} {self.key} (record {self.record_id}): {self.field}: "
                f"{self.against} {self.stored}, replay {self.replayed}")


@dataclass
class Report:
    files: int = 0
    frames: int = 0
    replayed: int = 0
    identical: int = 0
    samples: int = 0
    seconds: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    differing: set[str] = field(default_factory=set)
    without_record: list[archive.Frame] = field(default_factory=list)
    without_frame: list[Record] = field(default_factory=list)
    problems: list[archive.Problem] = field(default_factory=list)
    kernels: set[str] = field(default_factory=set)
    """Kernel versions named by the compared records."""
    older: int = 0
    """Records of an older schema: their frames are recomputed and compared, the records are not
    rebuilt (this version builds records of the current schemas only)."""

    @property
    def ok(self) -> bool:
        """No difference and no corrupt frame (torn frames and unmatched ones are reported only)."""
        return not self.differences and not any(p.kind != "torn" for p in self.problems)


# ------------------------------------------------------------------------------ recompute


def recompute(frame: archive.Frame) -> JobEnergy:
    """The frame's job energy by the agent's own kernel entry point."""
    return compute_job(*frame.inputs.args())


def _warm_up() -> None:
    """Load the kernel (from numba's cache) before the clock starts: the rate is the replay's."""
    t = np.array([0.0, 1.0, 2.0])
    compute_job(t, t.copy(), t.copy(), t[:1].copy(), np.zeros(1, np.uint8), 0.5, 1.5, 5.0)


def _bits(x: Any) -> str:
    """A float's exact identity (repr is the shortest string that reads back to the same float)."""
    return repr(float(x)) if isinstance(x, float) else repr(x)


def compare_result(frame: archive.Frame, got: JobEnergy) -> list[tuple[str, str, str]]:
    """Fields of ``JobEnergy`` that differ from the frame's, floats bit for bit."""
    out = []
    want = frame.result
    for name in JobEnergy.__dataclass_fields__:
        a, b = getattr(want, name), getattr(got, name)
        if isinstance(a, tuple):
            same = len(a) == len(b) and struct.pack(f"<{len(a)}d", *a) == struct.pack(f"<{len(b)}d", *b)
        elif isinstance(a, float):
            same = struct.pack("<d", a) == struct.pack("<d", b)
        else:
            same = a == b
        if not same:
            out.append((f"kernel.{name}", _text(a), _text(b)))
    return out


def _text(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(map(_bits, v)) + "]"
    return v if isinstance(v, str) else _bits(v)


def _window(frame: archive.Frame, energy: JobEnergy) -> tuple[int, float | None, tuple[str, ...]]:
    """Samples in the window, their median interval and the span's flags, as the tracker
    derives them from the same inputs."""
    x = frame.inputs
    lo, hi = np.searchsorted(x.t, x.t0, "left"), np.searchsorted(x.t, x.t1, "right")
    inside = x.t[lo:hi]
    median = float(np.median(np.diff(inside))) if len(inside) > 1 else None
    return int(hi - lo), median, span_flags(x.flags, energy)


def finished(frame: archive.Frame, rec: JobRecord | IntervalRecord, energy: JobEnergy) -> Finished:
    """The tracker's finished job or interval again: window, samples and flags from the frame,
    what the frame does not hold (job descriptors, boundaries, interval kind) from the record."""
    x = frame.inputs
    samples, median, flags = _window(frame, energy)
    if isinstance(rec, IntervalRecord):
        iv = rec.interval
        return FinishedInterval(frame.machine, iv.kind, iv.reason, x.t0, frame.start_wall, x.t1, frame.end_wall,
                                iv.parts, energy, samples, len(x.bad_t), median, flags, x)
    j, b = rec.job, rec.boundaries
    info = JobInfo(key=frame.key, key_point="", start=x.t0, start_wall=frame.start_wall, job_id=j.job_id,
                   program=j.program, product=j.product, serial=j.serials[0] if j.serials else None,
                   subassembly=j.subassembly, assignment=j.assignment, flags=set(x.flags),
                   start_basis=b.start.basis, start_reason=b.start.reason)
    return FinishedJob(frame.machine, info, x.t1, frame.end_wall, j.end_reason, j.parts, energy, samples,
                       len(x.bad_t), median, flags, x, b.end.basis, b.end.reason)


def rebuild(frame: archive.Frame, rec: JobRecord | IntervalRecord, energy: JobEnergy) -> Record:
    """The record ``records.record.build`` makes of the replayed span, with the ledger record's
    identity, chain position, factor, meter, CNC and provenance."""
    out = record.build(site=rec.site, agent=rec.agent, seq=rec.seq, prev_hash=rec.prev_hash,
                       span=finished(frame, rec, energy), factor=rec.emissions.factor, meter=rec.meter,
                       cnc=rec.cnc, config_hash=rec.provenance.config_hash)
    # the version that made it, not this one
    return dataclasses.replace(out, provenance=rec.provenance).with_hash()


def _leaves(v: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(v, dict) and v:
        for k, x in v.items():
            _leaves(x, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = canonical_json(v).decode()


def compare_record(stored: Record, rebuilt: Record) -> list[tuple[str, str, str]]:
    """(field, stored, rebuilt) for every leaf that differs, as canonical JSON text."""
    a: dict[str, str] = {}
    b: dict[str, str] = {}
    _leaves(stored.to_json(), "", a)
    _leaves(rebuilt.to_json(), "", b)
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(a.keys() | b.keys(), key=_field_order)
            if a.get(k) != b.get(k)]


def _field_order(k: str) -> tuple[bool, str]:
    return (k in ("hash",), k)  # the hash last: it differs whenever anything else does


# ------------------------------------------------------------------------------ progress


class Progress:
    """A one-line progress bar on a terminal stream, redrawn at most ten times a second."""

    def __init__(self, total: int, stream: TextIO, width: int = 30):
        self.total, self.stream, self.width = max(total, 1), stream, width
        self._shown = 0.0

    def update(self, done: int, frames: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._shown < 0.1:
            return
        self._shown = now
        share = min(1.0, done / self.total)
        bar = "#" * int(share * self.width)
        self.stream.write(f"\rreplay [{bar:<{self.width}}] {share * 100:5.1f}%  {frames} frames")
        self.stream.flush()

    def close(self, done: int, frames: int) -> None:
        self.update(done, frames, force=True)
        self.stream.write("\n")
        self.stream.flush()


# ------------------------------------------------------------------------------ replay


def replay(folder: Path, records: list[Record], *, machine: str | None = None, since: float | None = None,
           progress: TextIO | None = None) -> Report:
    """Replay the archive in ``folder`` against ``records`` (the ledger's, already filtered
    by machine and start time); ``progress`` is where to draw a bar (None: nowhere)."""
    _warm_up()
    t_start = time.monotonic()
    rep = Report()
    by_id = {r.record_id: r for r in records}
    seen: set[str] = set()
    paths = archive.files(folder, machine, None if since is None else archive.day_of(since))
    rep.files = len(paths)
    total = sum(p.stat().st_size for p in paths)
    bar = Progress(total, progress) if progress is not None else None
    done = 0
    for path in paths:
        data = path.read_bytes()
        for end, item in archive.scan(path, data):
            if bar is not None:
                bar.update(done + end, rep.frames)
            if isinstance(item, archive.Problem):
                rep.problems.append(item)
                continue
            if since is not None and item.start_wall < since:
                continue
            rep.frames += 1
            _replay_frame(item, by_id.get(item.record_id), rep)
            seen.add(item.record_id)
        done += len(data)
    if bar is not None:
        bar.close(done, rep.frames)
    rep.without_frame = [r for r in records if r.record_id not in seen]
    rep.seconds = time.monotonic() - t_start
    return rep


def _replay_frame(frame: archive.Frame, rec: Record | None, rep: Report) -> None:
    energy = recompute(frame)
    rep.samples += len(frame.inputs.t)
    diffs = [(f, "frame", a, b) for f, a, b in compare_result(frame, energy)]
    if rec is None:
        rep.without_record.append(frame)
    else:
        rep.kernels.add(rec.provenance.kernel)
        if isinstance(rec, JobRecordV1):
            rep.older += 1
        else:
            try:
                rebuilt = rebuild(frame, rec, energy)
            except (ValueError, RecordError) as exc:
                diffs.append(("record", "ledger", "unreadable", f"cannot be rebuilt: {exc}"))
            else:
                diffs += [(f, "ledger", a, b) for f, a, b in compare_record(rec, rebuilt)]
    rep.replayed += 1
    if diffs:
        rep.differing.add(frame.record_id)
        rep.differences += [Difference(frame.machine, frame.key, frame.record_id, f, src, a, b)
                            for f, src, a, b in diffs]
    elif rec is not None:  # identical means: to its frame's result and to its record
        rep.identical += 1


def summary(rep: Report, out: TextIO, limit: int = 50) -> None:
    """The report as text: differences (at most ``limit``), unmatched items, problems, totals."""
    for d in rep.differences[:limit]:
        out.write(f"DIFFERENT {d}\n")
    if len(rep.differences) > limit:
        out.write(f"... and {len(rep.differences) - limit} more differences\n")
    for p in rep.problems[:limit]:
        out.write(f"{p.kind.upper()} {p}\n")
    for f in rep.without_record[:limit]:
        out.write(f"no record for frame: {f.machine} {f.key} (record {f.record_id}) started "
                  f"{record.iso(f.start_wall)}\n")
    for r in rep.without_frame[:limit]:
        what = f"{r.interval.kind} interval" if isinstance(r, IntervalRecord) else f"job {r.job.key}"
        out.write(f"no frame for record: {r.machine} {what} (record {r.record_id}) seq {r.seq}\n")
    if rep.older:
        out.write(f"note: {rep.older} records of an older schema were checked against their frames only\n")
    if rep.kernels - {record.KERNEL}:
        out.write(f"note: records made by kernel(s) {', '.join(sorted(rep.kernels))}, replayed with {record.KERNEL}\n")
    torn = sum(p.kind == "torn" for p in rep.problems)
    rate = f", {rep.samples / rep.seconds:,.0f} samples/s" if rep.seconds > 0 and rep.samples else ""
    out.write(f"replay: {rep.replayed} jobs replayed from {rep.files} files: {rep.identical} identical, "
              f"{len(rep.differing)} differing ({len(rep.differences)} fields); "
              f"{len(rep.without_record)} frames without a record, {len(rep.without_frame)} records without a frame, "
              f"{torn} torn and {len(rep.problems) - torn} unreadable frames; "
              f"{rep.samples} samples in {rep.seconds:.2f} s{rate}\n")
