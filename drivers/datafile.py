"""Device knowledge as data: YAML files (meter profiles, node maps) validated into frozen
models, each file parsed once.

A file's ``name`` goes into every record decoded with it, so it must say which map that was: a
file outside the built-in folder may not take a built-in's name (a copy with a changed
address would otherwise pass for the original)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from energy_agent.core.errors import ConfigError
from energy_agent.core.validation import format_validation
from energy_agent.core.yamlfile import load_yaml

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
    data = load_yaml(path, kind)  # strict: UTF-8, no key twice; ConfigError names the file and place
    try:
        loaded = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{kind} {path}: {format_validation(exc)}") from exc
    name = getattr(loaded, "name", None)
    builtins = {p.stem: p for p in directory.glob("*.yaml")}
    if name in builtins and builtins[name].resolve() != path.resolve():
        raise ConfigError(f"{kind} {ref}: name {name!r} is a built-in {kind.removeprefix('meter ')}'s; "
                          "give your copy its own name")
    _LOADED[key] = loaded
    return loaded
