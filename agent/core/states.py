"""Operating states of a machine tool (ISO 14955-1 style), their codes in sample buffers, and
the rules that turn a CNC's values into a state and a job (the ``states`` and ``job`` sections
of a node map)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from energy_agent.core.validation import Model

STATES: tuple[str, ...] = ("off", "standby", "ready", "processing", "interrupted", "setup")
"""State names; the index of a name is its code (uint8) in buffers and kernels."""

CODE: dict[str, int] = {name: i for i, name in enumerate(STATES)}
N_STATES = len(STATES)


def code(name: str) -> int:
    try:
        return CODE[name]
    except KeyError:
        raise ValueError(f"unknown operating state {name!r} (known: {', '.join(STATES)})") from None


Scalar = int | float | str | bool


class StateRule(Model):
    when: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
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
            if isinstance(want, list):
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
