"""Shared by every configuration model: a frozen base that refuses unknown keys, and
pydantic's errors turned into messages that name the field (``machines[2].meter: …``)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Ids of sites, agents, devices and machines: they appear in topics, record ids and file names."""


class Model(BaseModel):
    """Base of every config, profile and node-map model: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_validation(exc: ValidationError) -> str:
    """pydantic errors as 'machines[2].meter: message' lines."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        if loc and re.match(r"^[A-Za-z_][\w.\[\]]*: ", msg):
            lines.append(f"{loc}.{msg}")  # a nested validator named a field below loc
        else:
            lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)
