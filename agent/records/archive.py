"""The raw-sample archive: every recorded job's kernel inputs, append-only, one file per
machine and UTC day, so that ``energy-agent replay`` can recompute each record exactly.

A record says how much energy a job took; the archive keeps what that figure was computed
from: the meter samples and the state timeline exactly as ``compute_job`` received them, the
job window and the tracker parameters that change the result. Replaying a frame with the same
kernel gives the same floats, bit for bit, so a difference means that a record, a frame or the
kernel changed.

Each job is one self-describing binary frame (byte layout in docs/ARCHIVE.md): a header with
magic, format version, record id, lengths and CRC-32s, then the payload. A frame is written
with one ``write`` and an ``fsync`` on a dedicated thread, after the ledger committed its
record, so a slow or failing archive disk never holds up a record. A process killed in the
middle of a write leaves a torn frame; the reader reports it, resynchronises on the next valid
header and never raises on what it reads.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from energy_agent.core.record import Method
from energy_agent.domain.energy import JobEnergy, JobInputs
from energy_agent.domain.spans import Finished, FinishedJob

log = logging.getLogger(__name__)

MAGIC = b"EAJF"  # energy-agent job frame
VERSION = 1
SUFFIX = ".frames"
HEADER = struct.Struct("<4sHH16sIII")
"""magic, version, header length, record id (16 bytes), payload length, payload CRC-32,
CRC-32 of the header's first 32 bytes."""
FIXED = struct.Struct("<7d3I3H2B4I4d")
"""t0, t1, max_gap_s, rollover_kwh, max_power_w, start_wall, end_wall; n samples, m state
changes, k bad-sample times; machine, key and flags lengths; states in the result, method code;
gap_count, counter_resets, counter_rollovers, counter_jumps; kwh, estimated_kwh, coverage,
longest_gap_s. The result's kWh by state follows (float64 each)."""
METHODS: tuple[Method, ...] = ("none", "counter", "power", "mixed")
MAX_TEXT = 0xFFFF


# ------------------------------------------------------------------------------ frames


@dataclass(frozen=True, eq=False)
class Frame:
    """One archived job or interval: its record id, identity (machine, job key or
    ``interval:<kind>``), kernel inputs and the agent's result."""

    record_id: str
    machine: str
    key: str
    start_wall: float
    end_wall: float
    inputs: JobInputs
    result: JobEnergy


@dataclass(frozen=True)
class Problem:
    """Bytes of an archive file that are not a readable frame."""

    path: Path
    offset: int
    kind: str
    """``torn`` (a frame cut short: killed while writing), ``corrupt`` (altered after writing)
    or ``unsupported`` (a newer format version)."""
    detail: str

    def __str__(self) -> str:
        return f"{self.path.name}@{self.offset}: {self.kind}: {self.detail}"


def _text(name: str, s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > MAX_TEXT:
        raise ValueError(f"{name} is {len(b)} bytes, more than a frame holds ({MAX_TEXT})")
    return b


def encode(frame: Frame) -> bytes:
    """The frame's bytes: header and payload."""
    x, r = frame.inputs, frame.result
    n, m, k = len(x.t), len(x.st_t), len(x.bad_t)
    if not (len(x.e) == len(x.p) == n and len(x.st_s) == m):
        raise ValueError(f"record {frame.record_id}: sample or state columns differ in length")
    machine, key = _text("machine", frame.machine), _text("job key", frame.key)
    flags = _text("flags", ",".join(x.flags))
    fixed = FIXED.pack(x.t0, x.t1, x.max_gap_s, x.rollover_kwh, x.max_power_w, frame.start_wall, frame.end_wall,
                       n, m, k, len(machine), len(key), len(flags), len(r.kwh_by_state), METHODS.index(r.method),
                       r.gap_count, r.counter_resets, r.counter_rollovers, r.counter_jumps,
                       r.kwh, r.estimated_kwh, r.coverage, r.longest_gap_s)
    payload = b"".join((
        fixed, np.asarray(r.kwh_by_state, "<f8").tobytes(), machine, key, flags,
        np.asarray(x.t, "<f8").tobytes(), np.asarray(x.e, "<f8").tobytes(), np.asarray(x.p, "<f8").tobytes(),
        np.asarray(x.st_t, "<f8").tobytes(), np.asarray(x.st_s, np.uint8).tobytes(),
        np.asarray(x.bad_t, "<f8").tobytes(),
    ))
    head = HEADER.pack(MAGIC, VERSION, HEADER.size, bytes.fromhex(frame.record_id), len(payload),
                       zlib.crc32(payload), 0)
    return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4])) + payload


def _decode(record_id: str, payload: bytes) -> Frame:
    """A frame from its payload; ValueError or struct.error when the lengths do not add up."""
    f = FIXED.unpack_from(payload, 0)
    t0, t1, max_gap_s, rollover_kwh, max_power_w, start_wall, end_wall = f[:7]
    n, m, k, lm, lk, lf, ns, method = f[7:15]
    gaps, resets, rollovers, jumps = f[15:19]
    kwh, est, coverage, longest = f[19:23]
    size = FIXED.size + 8 * ns + lm + lk + lf + 8 * 3 * n + 9 * m + 8 * k
    if size != len(payload):
        raise ValueError(f"payload is {len(payload)} bytes, its lengths say {size}")
    pos = FIXED.size

    def floats(count: int) -> np.ndarray:
        nonlocal pos
        a = np.frombuffer(payload, "<f8", count, pos).astype(np.float64)  # a writable, aligned copy
        pos += 8 * count
        return a

    def text(count: int) -> str:
        nonlocal pos
        s = payload[pos:pos + count].decode("utf-8")
        pos += count
        return s

    by_state = tuple(float(v) for v in floats(ns))
    machine, key, flags = text(lm), text(lk), text(lf)
    t, e, p, st_t = floats(n), floats(n), floats(n), floats(m)
    st_s = np.frombuffer(payload, np.uint8, m, pos).copy()
    pos += m
    bad = floats(k)
    inputs = JobInputs(t, e, p, st_t, st_s, t0, t1, max_gap_s, rollover_kwh, max_power_w, bad,
                       tuple(flags.split(",")) if flags else ())
    result = JobEnergy(kwh_by_state=by_state, kwh=kwh, estimated_kwh=est, method=METHODS[method], coverage=coverage,
                       gap_count=gaps, longest_gap_s=longest, counter_resets=resets, counter_rollovers=rollovers,
                       counter_jumps=jumps)
    return Frame(record_id, machine, key, start_wall, end_wall, inputs, result)


def _header_at(data: bytes, pos: int) -> tuple[Any, ...] | None:
    """The header at ``pos`` when it is complete and its CRC matches, else None."""
    if len(data) - pos < HEADER.size or data[pos:pos + 4] != MAGIC:
        return None
    h = HEADER.unpack_from(data, pos)
    if zlib.crc32(data[pos:pos + HEADER.size - 4]) != h[6] or h[2] < HEADER.size:
        return None
    return h


def _next_header(data: bytes, start: int) -> int:
    """Offset of the next valid header at or after ``start``; len(data) when there is none."""
    i = data.find(MAGIC, start)
    while i != -1:
        if _header_at(data, i) is not None:
            return i
        i = data.find(MAGIC, i + 1)
    return len(data)


def scan(path: Path, data: bytes | None = None) -> Iterator[tuple[int, Frame | Problem]]:
    """(offset after the item, frame or problem) for every frame and unreadable span of a file.

    Never raises on content: a span without a valid header is a torn frame when it begins
    like a frame (the magic, or as much of it as the span holds), else corrupt; a frame whose bytes
    end before its stated length (the file ends, or the next frame begins) is torn; a complete
    frame whose payload CRC does not match is corrupt.
    """
    if data is None:
        data = path.read_bytes()
    pos, size = 0, len(data)
    while pos < size:
        h = _header_at(data, pos)
        if h is None:
            nxt = _next_header(data, pos + 1)
            head = data[pos:min(pos + 4, nxt)]
            torn = head == MAGIC[:len(head)]  # the beginning of a frame whose header was cut short
            kind = "torn" if torn else "corrupt"
            what = "a partial frame header" if torn else "no valid frame header"
            yield nxt, Problem(path, pos, kind, f"{nxt - pos} bytes with {what}")
            pos = nxt
            continue
        _, version, hlen, rid, plen, pcrc, _ = h
        end = pos + hlen + plen
        payload = data[pos + hlen:end]
        whole = end <= size and (end == size or _header_at(data, end) is not None) and zlib.crc32(payload) == pcrc
        nxt = size if whole else _next_header(data, pos + 1)  # search inside only when something is wrong
        if nxt < end or end > size:
            yield min(nxt, size), Problem(path, pos, "torn", f"frame of record {rid.hex()} has {min(nxt, size) - pos} "
                                          f"of its {hlen + plen} bytes")
            pos = min(nxt, size)
            continue
        if zlib.crc32(payload) != pcrc:
            yield end, Problem(path, pos, "corrupt", f"frame of record {rid.hex()}: payload CRC-32 does not match")
        elif version != VERSION:
            yield end, Problem(path, pos, "unsupported", f"frame of record {rid.hex()} has format version {version}, "
                                                          f"this reader knows {VERSION}")
        else:
            try:
                yield end, _decode(rid.hex(), payload)
            except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
                yield end, Problem(path, pos, "corrupt", f"frame of record {rid.hex()}: {exc}")
        pos = end


def files(folder: Path, machine: str | None = None, since_day: str | None = None) -> list[Path]:
    """Archive files, by machine then day; ``since_day`` (YYYY-MM-DD) skips earlier days."""
    out: list[Path] = []
    if not folder.is_dir():
        return out
    for d in sorted(folder.iterdir()):
        if not d.is_dir() or (machine is not None and d.name != machine):
            continue
        out += [f for f in sorted(d.glob("*" + SUFFIX)) if since_day is None or f.stem >= since_day]
    return out


def day_of(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).date().isoformat()


def path_for(folder: Path, machine: str, end_wall: float) -> Path:
    """The file a job is appended to: its machine's folder, the UTC day the job ended."""
    return folder / machine / (day_of(end_wall) + SUFFIX)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append(path: Path, data: bytes) -> None:
    """Append one frame with one write and fsync it; a new file's directory entry too."""
    new = not path.exists()
    if new:
        created = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(path.parent.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:  # one write for a regular file; the loop only guards against a short one
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(path.parent)


# ------------------------------------------------------------------------------ writer


class ArchiveWriter:
    """Appends frames on one dedicated thread, in the order they are submitted.

    ``submit`` never waits and never raises: the loop hands over the job and goes on. A
    failure is logged once per outage, and the record (already committed) is not affected.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
        self._failing = False
        self.written = 0

    @classmethod
    def for_config(cls, loaded: Any) -> ArchiveWriter | None:
        """The writer of ``loaded``'s archive section; None when the archive is off."""
        a = loaded.config.archive
        return cls(a.folder(loaded.config.ledger.path, loaded.base)) if a.enabled else None

    def submit(self, record_id: str, span: Finished) -> None:
        """Queue the frame of a finished job or interval stored as ``record_id``."""
        try:
            self._pool.submit(self._write, record_id, span)
        except RuntimeError:  # shut down: the agent is stopping
            log.warning("archive: closed; the frame of record %s is not written", record_id)

    def _write(self, record_id: str, span: Finished) -> None:
        path = None
        key, start_wall = (span.info.key, span.info.start_wall) if isinstance(span, FinishedJob) else (
            span.key, span.start_wall)
        try:
            if span.inputs is None:
                raise ValueError("the samples were not captured")
            frame = Frame(record_id, span.machine, key, start_wall, span.end_wall, span.inputs, span.energy)
            path = path_for(self.folder, span.machine, span.end_wall)
            append(path, encode(frame))
        except (OSError, ValueError) as exc:  # never let the archive cost a record
            if not self._failing:
                log.error("archive: cannot append the frame of %s %s (record %s) to %s: %s; records are "
                          "stored as usual, frames are missing until this clears", span.machine, key,
                          record_id, path or self.folder, exc)
                self._failing = True
            return
        self.written += 1
        if self._failing:
            log.info("archive: frames are written again (%s)", path)
            self._failing = False

    def close(self, wait: bool = True) -> None:
        """Stop taking frames; with ``wait``, return when every queued frame is written."""
        self._pool.shutdown(wait=wait)
