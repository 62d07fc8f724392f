"""The wheel: one top-level package, ``energy_agent``, with every module, its data files and the
``energy-agent`` entry point, and a declared requirement for every library it imports.

The wheel is built from a copy of the source tree: a build in the tree leaves ``build/`` behind,
and files an earlier build left there would land in the wheel. ``make wheel-demo`` (run by
``.ci/run``) goes further: it installs the wheel in a fresh venv and runs the demo from there.
"""

from __future__ import annotations

import ast
import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from energy_agent import __version__

ROOT = Path(__file__).resolve().parents[1]
DIST_INFO = f"energy_agent-{__version__}.dist-info"
FOLDERS = {"agent": "energy_agent", "drivers": "energy_agent/drivers", "simulators": "energy_agent/simulators",
           "config": "energy_agent/examples"}
"""Source folder -> where it lands in the wheel (pyproject.toml's package-dir)."""
DATA = ("drivers/profiles/*.yaml", "drivers/profiles/README.md", "drivers/nodemaps/*.yaml", "drivers/nodemaps/README.md",
        "simulators/scenarios/*.yaml", "simulators/README.md", "config/*.yaml")
"""Data files the package reads at run time: meter profiles, node maps, scenarios, example configs."""
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "var", "*.db", "*.db-wal", "*.db-shm")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
                          str(src)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout}\n{out.stderr}"
    built = list((tmp / "dist").glob("*.whl"))
    assert [w.name for w in built] == [f"energy_agent-{__version__}-py3-none-any.whl"]
    with zipfile.ZipFile(built[0]) as whl:
        yield whl


def _in_wheel(path: Path) -> str:
    """Where a source file lands in the wheel."""
    rel = path.relative_to(ROOT)
    return "/".join([FOLDERS[rel.parts[0]], *rel.parts[1:]])


def _expected_files() -> set[str]:
    """Every module of the source folders and every data file, as wheel paths."""
    modules = {p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    data = {p for pattern in DATA for p in ROOT.glob(pattern)}
    return {_in_wheel(p) for p in modules | data}


def test_wheel_holds_only_the_energy_agent_package(wheel):
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {"energy_agent", DIST_INFO}
    assert wheel.read(f"{DIST_INFO}/top_level.txt").decode().split() == ["energy_agent"]


def test_wheel_has_every_module_and_data_file(wheel):
    files = {n for n in wheel.namelist() if not n.startswith(DIST_INFO)}
    expected = _expected_files()
    assert files == expected, f"missing: {sorted(expected - files)}; unexpected: {sorted(files - expected)}"
    for data in ("energy_agent/drivers/profiles/eastron-sdm630.yaml", "energy_agent/drivers/nodemaps/opc40502.yaml",
                 "energy_agent/simulators/scenarios/demo.yaml", "energy_agent/examples/plant.example.yaml",
                 "energy_agent/examples/demo.yaml"):
        assert data in files


def test_wheel_declares_the_entry_point(wheel):
    entry = configparser.ConfigParser()
    entry.read_string(wheel.read(f"{DIST_INFO}/entry_points.txt").decode())
    assert dict(entry["console_scripts"]) == {"energy-agent": "energy_agent.app.cli:main"}


def _imported_top_levels(wheel: zipfile.ZipFile) -> dict[str, str]:
    """Top-level names of the non-standard-library modules the wheel's code imports -> one file importing it."""
    out = {}
    for name in wheel.namelist():
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(wheel.read(name), name)):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top != "energy_agent" and top not in sys.stdlib_module_names:
                        out.setdefault(top, name)
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_library_is_a_declared_requirement(wheel):
    """What the wheel imports must be installed with it: in a fresh venv only the requirements are."""
    metadata = wheel.read(f"{DIST_INFO}/METADATA").decode()
    required = {_normal(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group())
                for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    providers = packages_distributions()
    missing = []
    for top, where in sorted(_imported_top_levels(wheel).items()):
        dists = {_normal(d) for d in providers.get(top, [])}
        if not dists & required:
            missing.append(f"{where} imports {top} (distribution {', '.join(sorted(dists)) or 'unknown'})")
    assert not missing, "imported but not in [project] dependencies:\n" + "\n".join(missing)
