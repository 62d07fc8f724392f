"""What the tracker hands on: finished jobs and finished intervals, each with its energy.

A machine's time is cut into spans that tile it without overlap from its first observation
on: jobs, and intervals between them. An interval is ``idle`` when the CNC was observed and
ran no job, ``unobserved`` when jobs could not be observed (the CNC unreachable, its job or
state signals Bad, the agent not running). Each span becomes one record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from energy_agent.domain.energy import JobEnergy, JobInputs

OBSERVED = "observed"
SOURCE_TIMESTAMP = "source_timestamp"
ESTIMATED = "estimated"
AGENT_START = "agent_start"
"""How a job boundary is known (``energy_agent.core.record.Boundary``)."""


@dataclass
class JobInfo:
    """An open job: identity, what it makes, how its start is known, flags gathered so far."""

    key: str
    key_point: str
    start: float
    start_wall: float
    job_id: str | None = None
    program: str | None = None
    product: str | None = None
    serial: str | None = None
    subassembly: str | None = None
    assignment: str | None = None
    """Where product, serial or subassembly came from: ``cnc``, ``program`` (the machine's
    program table), None."""
    parts_start: int | None = None
    """The parts counter when the job started (None: unknown, so the job's parts are unknown)."""
    flags: set[str] = field(default_factory=set)
    start_basis: str = OBSERVED
    start_reason: str | None = None


@dataclass(frozen=True)
class FinishedJob:
    machine: str
    info: JobInfo
    end: float
    end_wall: float
    end_reason: str
    parts: int | None
    energy: JobEnergy
    samples: int
    bad_samples: int
    median_interval_s: float | None
    flags: tuple[str, ...]
    inputs: JobInputs | None = None
    """What the energy kernel received, for the raw-sample archive (None: not captured)."""
    end_basis: str = OBSERVED
    end_note: str | None = None
    """Why the end is not observed (with ``end_basis`` other than observed)."""


@dataclass(frozen=True)
class FinishedInterval:
    machine: str
    kind: str
    """``idle`` or ``unobserved``."""
    reason: str | None
    start: float
    start_wall: float
    end: float
    end_wall: float
    parts: int | None
    """Parts counted by the CNC during the interval (None: no counter or not known)."""
    energy: JobEnergy
    samples: int
    bad_samples: int
    median_interval_s: float | None
    flags: tuple[str, ...]
    inputs: JobInputs | None = None

    @property
    def key(self) -> str:
        """The archive's name for it (jobs: the job key)."""
        return f"interval:{self.kind}"


Finished = FinishedJob | FinishedInterval


def span_flags(own: tuple[str, ...] | set[str], energy: JobEnergy) -> tuple[str, ...]:
    """A span's flags: its own (gathered while it ran) and those its energy implies."""
    flags = set(own)
    if energy.counter_resets:
        flags.add("counter_reset")
    if energy.counter_jumps:
        flags.add("counter_jump")
    if energy.estimated_kwh > 0:
        flags.add("estimated_energy")
    if energy.coverage < 1.0:
        flags.add("incomplete_coverage")
    return tuple(sorted(flags))
