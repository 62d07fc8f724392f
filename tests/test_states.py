"""State rules: equality, lists and comparisons of numeric points (node map ``states``)."""

import pytest
from pydantic import ValidationError

from energy_agent.core.states import MachineRules

RULES = MachineRules(states=[
    {"when": {"channel_status": 1}, "state": "interrupted"},
    {"when": {"spindle_rpm": {"lt": 1}, "mode": [1, 2]}, "state": "setup"},
    {"when": {"spindle_rpm": {"ge": 1, "le": 24000}}, "state": "processing"},
    {"when": {"spindle_rpm": {"gt": 24000}}, "state": "interrupted"},
    {"when": {"door": {"ne": "closed"}}, "state": "setup"},
    {"state": "ready"},
])


@pytest.mark.parametrize("values, state", [
    ({"channel_status": 1, "spindle_rpm": 5000}, "interrupted"),  # first match wins
    ({"spindle_rpm": 0.0, "mode": 2}, "setup"),
    ({"spindle_rpm": 0.0, "mode": 0, "door": "closed"}, "ready"),
    ({"spindle_rpm": 1, "door": "closed"}, "processing"),  # a bound is inclusive with le/ge
    ({"spindle_rpm": 24000.5}, "interrupted"),
    ({"spindle_rpm": None, "door": "open"}, "setup"),  # a missing value holds no bound, ne holds
    ({"spindle_rpm": "fast", "door": "closed"}, "ready"),  # text is not a number
    ({"spindle_rpm": True, "door": "closed"}, "ready"),  # nor is a boolean
    ({"spindle_rpm": float("nan"), "door": "closed"}, "ready"),
    ({"door": None}, "ready"),  # ne needs a value to differ
])
def test_comparisons(values, state):
    assert RULES.state_of(values) == state


def test_an_empty_comparison_is_refused():
    with pytest.raises(ValidationError, match="needs at least one of lt, le, gt, ge, ne"):
        MachineRules(states=[{"when": {"spindle_rpm": {}}, "state": "setup"}, {"state": "ready"}])
