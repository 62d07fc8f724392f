"""Secrets (passwords, tokens) from an environment variable or a file, never from the YAML
and never logged; errors name the config field and what is missing, never the secret."""

from __future__ import annotations

import os
from pathlib import Path

from energy_agent.core.errors import ConfigError


def read_secret(where: str, env: str | None, file: Path | None, base: Path) -> str | None:
    """The value of environment variable ``env``, else the first line of ``file`` (relative to
    ``base``), else None. ``where`` is the config path of the section, e.g. ``mqtt``."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}.password_env: environment variable {env} is not set")
        return value
    if file:
        path = file if file.is_absolute() else base / file
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{where}.password_file: cannot read {path}: {exc.strerror}") from exc
        return text.splitlines()[0] if text else ""
    return None
