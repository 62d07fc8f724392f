"""The folder tree is the layer diagram (docs/ARCHITECTURE.md): each package imports only the
packages below it. This walks every module's AST, top-level and function-level imports alike,
and fails on an import that points up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"agent": "energy_agent", "drivers": "energy_agent.drivers", "simulators": "energy_agent.simulators",
           "config": "energy_agent.examples"}
"""Source folder -> the package it installs as (pyproject.toml's package-dir)."""

ALLOWED = {
    "core": set(),
    "drivers": {"core"},
    "domain": {"core"},
    "records": {"core", "domain"},
    "delivery": {"core", "records"},
    "bridge": {"core", "records", "delivery"},
    "simulators": {"core", "drivers", "examples"},
    "app": {"core", "drivers", "domain", "records", "delivery", "bridge", "simulators", "examples"},
    "examples": set(),
    "": {"app"},  # energy_agent/__init__.py and __main__.py
}
"""Layer -> the layers it may import (besides itself). Third-party imports are not limited here."""


def _layer(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "energy_agent", module
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([package, *parts]), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # "from energy_agent import app" names a package too
            if node.module == "energy_agent":
                out += [(node.lineno, f"energy_agent.{a.name}") for a in node.names if a.name != "__version__"]
    return out


MODULES = _modules()


def test_every_source_module_is_in_a_known_layer():
    assert len(MODULES) > 40
    for module, path in MODULES:
        assert _layer(module) in ALLOWED, f"{path}: not in a known layer"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module, path):
    layer = _layer(module)
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top in ("agent", "drivers", "simulators", "config", "tests", "benchmarks"):
            bad.append(f"{path.name}:{line}: imports {name!r}: the installed package is energy_agent.*")
            continue
        if top != "energy_agent" or name == "energy_agent":
            continue
        target = _layer(name)
        if target != layer and target not in ALLOWED[layer]:
            bad.append(f"{path.name}:{line}: {layer or 'energy_agent'} imports {name} ({target} is not below it)")
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The walk itself: an import of the app from the domain is found (a check that cannot fail is no check)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from energy_agent.app.config import Config\n")
    assert (2, "energy_agent.app.config") in _imports(f)
    assert _layer("energy_agent.app.config") not in ALLOWED["domain"]
