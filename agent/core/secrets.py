"""Secrets (passwords, tokens) from an environment variable or a file, never from the YAML
and never logged; errors name the config field and what is missing, never the secret."""

from __future__ import annotations

import os
from pathlib import Path

from energy_agent.core.errors import ConfigError

MAX_SECRET_FILE = 64 * 1024
"""Bytes of a password file read (its first line is the secret)."""


def read_secret(where: str, env: str | None, file: Path | None, base: Path, *, device: str | None = None,
                field: str = "password") -> str | None:
    """The value of environment variable ``env``, else the first line of ``file`` (relative to
    ``base``), else None. ``where`` is the config path of the section, e.g. ``mqtt``; ``device``
    (if any) is named after the field; ``field`` is what the secret is (``password_env``,
    ``password_file``; ``token_env``). An unset variable, an unreadable or empty file, an empty
    value are errors: a service must not start to find its credentials missing."""
    about = f" ({device})" if device else ""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}.{field}_env{about}: environment variable {env} is not set")
        if not value:
            raise ConfigError(f"{where}.{field}_env{about}: environment variable {env} is empty")
        return value
    if file:
        path = file if file.is_absolute() else base / file
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SECRET_FILE)  # the first line is all that counts
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{where}.{field}_file{about}: cannot read {path}: {reason}") from exc
        first = data.split(b"\n", 1)[0]
        try:
            text = first.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}.{field}_file{about}: {path} is not UTF-8 text") from exc
        value = text.splitlines()[0] if text else ""
        if not value:
            raise ConfigError(f"{where}.{field}_file{about}: {path} is empty (the first line is the {field})")
        return value
    return None
