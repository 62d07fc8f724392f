"""The per-job kernel compiled ahead of time, so that the agent process never loads LLVM.

numba's JIT keeps LLVM and its compiled code in every process that calls a kernel: about
100 MB of a gateway agent's memory, for one function that runs once per finished job.
``build`` compiles ``agent.kernels.job_energy`` with ``numba.pycc`` into a small extension
module (no numba, no LLVM at run time) and ``load`` imports it. Without fast-math the build
computes exactly what the JIT computes (IEEE operations in the same order); the tests compare
them bit for bit, and ``energy-agent replay`` compares the agent's records with either.

The module's name carries a hash of the kernel source (``kernels.py``, ``energy.py``,
``states.py``) and of the numba version, so a build from an older source is never loaded:
after an upgrade the agent falls back to the JIT (and says so) until ``energy-agent kernels
build`` has been run again. ``make`` runs it when it installs the package.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Callable

PACKAGE = Path(__file__).resolve().parent
AOT_DIR = PACKAGE / "_aot"
SOURCES = ("kernels.py", "energy.py", "states.py")
SIGNATURE = "Tuple((f8[:], f8[:], f8[:]))(f8[:], f8[:], f8[:], f8[:], u1[:], f8, f8, f8, f8, f8)"
"""``job_energy`` as ``compute_job`` calls it: float64 t, e, p and st_t, uint8 st_s, five floats."""


def source_key() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (PACKAGE / name).read_bytes() + b"\0")
    h.update(importlib.metadata.version("numba").encode())
    return h.hexdigest()[:16]


def module_name() -> str:
    return f"job_energy_{source_key()}"


def module_path(directory: Path | None = None) -> Path:
    return (directory or AOT_DIR) / (module_name() + importlib.machinery.EXTENSION_SUFFIXES[0])


def describe_missing() -> str:
    return (f"no ahead-of-time kernel for the current source ({module_path()} is missing); "
            "run `energy-agent kernels build`")


def load(directory: Path | None = None) -> Callable | None:
    """``job_energy`` from the build for the current source, or None when there is none."""
    path = module_path(directory)
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(module_name(), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.job_energy


def build(directory: Path | None = None) -> Path:
    """Compile the current ``job_energy`` into ``directory`` (needs a C compiler and the Python
    headers; ~10 s) and remove builds of older sources there. Returns the module's path."""
    import warnings

    from numba.core.errors import NumbaPendingDeprecationWarning

    with warnings.catch_warnings():  # pycc is marked for replacement; it is what exists today
        warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)
        from numba.pycc import CC

    from agent import kernels

    directory = directory or AOT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    cc = CC(module_name())
    cc.output_dir = str(directory)
    cc.verbose = False
    cc.export("job_energy", SIGNATURE)(kernels.job_energy.py_func)
    cc.compile()
    path = module_path(directory)
    if not path.is_file():
        raise RuntimeError(f"numba.pycc finished but {path} was not written")
    for old in directory.glob("job_energy_*"):
        if old != path:
            old.unlink()
    return path
