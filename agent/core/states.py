"""Operating states of a machine tool (ISO 14955-1 style), their codes in sample buffers, and
the rules that turn a CNC's values into a state and a job (the ``states`` and ``job`` sections
of a node map)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator, model_validator

from energy_agent.core.validation import Model

STATES: tuple[str, ...] = ("off", "standby", "ready", "processing", "interrupted", "setup")
"""State names; the index of a name is its code (uint8) in buffers and kernels."""

CODE: dict[str, int] = {name: i for i, name in enumerate(STATES)}
N_STATES = len(STATES)


def code(name: str) -> int:
    try:
        return CODE[name]
    except KeyError as exc:
        raise ValueError(f"unknown operating state {name!r} (known: {', '.join(STATES)})") from exc


Scalar = int | float | str | bool


class Compare(Model):
    """A comparison of a numeric point, e.g. ``{lt: 1}`` (spindle speed below 1 rpm) or
    ``{ge: 0.5, lt: 100}``. Every bound given must hold; a missing or non-numeric value holds
    none."""

    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    ne: Scalar | None = None

    @model_validator(mode="after")
    def _some(self) -> Compare:
        if all(getattr(self, k) is None for k in ("lt", "le", "gt", "ge", "ne")):
            raise ValueError("a comparison needs at least one of lt, le, gt, ge, ne")
        return self

    def holds(self, have: Any) -> bool:
        if self.ne is not None and have == self.ne:
            return False
        bounds: list[tuple[float | None, Callable[[float, float], bool]]] = [
            (self.lt, lambda x, b: x < b), (self.le, lambda x, b: x <= b),
            (self.gt, lambda x, b: x > b), (self.ge, lambda x, b: x >= b)]
        if all(b is None for b, _ in bounds):
            return have is not None
        if isinstance(have, bool) or not isinstance(have, (int, float)) or have != have:
            return False
        return all(b is None or ok(have, b) for b, ok in bounds)


class StateRule(Model):
    when: dict[str, Scalar | list[Scalar] | Compare] = Field(default_factory=dict, description=(
        "point -> the value it must have, a list of values (any of them), or a comparison "
        "({lt, le, gt, ge, ne}: e.g. spindle_speed: {lt: 1})"))
    state: str

    @field_validator("state")
    @classmethod
    def _state(cls, v: str) -> str:
        if v not in STATES:
            raise ValueError(f"unknown state {v!r} (known: {', '.join(STATES)})")
        return v

    def matches(self, values: dict[str, Any]) -> bool:
        for name, want in self.when.items():
            have = values.get(name)
            if isinstance(want, Compare):
                if not want.holds(have):
                    return False
            elif isinstance(want, list):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True


class JobRule(Model):
    key: list[str] = Field(
        default_factory=lambda: ["job_id", "program"],
        description="points that identify a job; the first non-empty one is the job key",
    )
    active_states: list[str] = Field(
        default_factory=lambda: ["processing", "interrupted", "setup"],
        description="a job starts when the machine enters one of these with a job key",
    )
    end_on_parts_increment: bool = Field(True, description="a rising parts counter closes the job")
    end_on_idle: bool = Field(
        True, description="returning to ready/standby/off closes the job (program end, M30 reset)"
    )


class MachineRules(Model):
    """A machine's state rules (first match wins; the last has no ``when``) and job rule."""

    states: list[StateRule]
    job: JobRule = Field(default_factory=JobRule)

    def points(self) -> list[str]:
        """The CNC points these rules read: state conditions and job keys."""
        seen = dict.fromkeys(p for rule in self.states for p in rule.when)
        seen.update(dict.fromkeys(self.job.key))
        return list(seen)

    def state_of(self, values: dict[str, Any]) -> str:
        for rule in self.states:
            if rule.matches(values):
                return rule.state
        return self.states[-1].state
