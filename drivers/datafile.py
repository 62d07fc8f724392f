"""Device knowledge as data: YAML files (meter profiles, node maps) validated into frozen
models, each file parsed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from energy_agent.core.errors import ConfigError
from energy_agent.core.validation import format_validation

_LOADED: dict[tuple, Any] = {}


def load_model(kind: str, directory: Path, ref: str, base: Path | None, model: type[BaseModel]) -> Any:
    path = Path(ref)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{ref}.yaml"
    elif not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"{kind} {ref!r} not found (built-in: {known}; or give a path to a .yaml file)")
    # Thousands of meters share a few profiles: parse each file once (the models are frozen).
    key = (model, str(path.resolve()), path.stat().st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    try:
        data = yaml.safe_load(path.read_text())
        _LOADED[key] = loaded = model.model_validate(data)
        return loaded
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{kind} {path}: {format_validation(exc)}") from exc
