"""The per-job kernel compiled ahead of time: what the agent runs, equal to the JIT bit for bit.

``make`` builds it (``energy-agent kernels build``); these tests need that build and fail
without it, because an agent silently falling back to the JIT would carry ~100 MB more.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from agent import aot, energy, kernels
from tests.test_kernel_batch import MAX_POWER_W, ROLLOVER_KWH, agent_view, plant


@pytest.fixture(scope="module")
def built():
    f = aot.load()
    assert f is not None, aot.describe_missing()
    return f


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_ahead_of_time_build_equals_the_jit_bit_for_bit(built, seed):
    t, e, p, st_t, st_s, t0, t1 = plant(seed)
    for k in range(len(t0)):
        for view in ((t, e, p, st_t, st_s), agent_view(t, e, p, st_t, st_s, t0[k], t1[k])):
            view = tuple(np.ascontiguousarray(a) for a in view)
            a = built(*view, t0[k], t1[k], 5.0, ROLLOVER_KWH, MAX_POWER_W)
            j = kernels.job_energy(*view, t0[k], t1[k], 5.0, ROLLOVER_KWH, MAX_POWER_W)
            for got, want in zip(a, j):
                assert got.tobytes() == want.tobytes(), k


def test_compute_job_runs_the_ahead_of_time_build(built):
    assert energy.warm_up() == "ahead-of-time build"
    assert energy.live_kernel() is not kernels.job_energy


def test_the_agent_process_never_loads_numba(built, tmp_path):
    # What the agent imports and runs before and while polling (runtime, drivers, publisher),
    # then a job computed: numba and llvmlite stay out of the process.
    code = ("import sys\n"
            "import agent.cli, agent.runtime, agent.publish, agent.mqtt, agent.status, agent.replay, drivers.modbus, drivers.opcua\n"
            "from agent import energy\n"
            "print(energy.warm_up())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ENERGY_AGENT_KERNEL": "auto"}, check=True).stdout.splitlines()
    assert out == ["ahead-of-time build", "[]"]


def test_a_build_of_another_source_is_never_loaded(tmp_path, monkeypatch):
    # The key covers the kernel source: one changed byte and the old build is not found.
    for name in aot.SOURCES:
        (tmp_path / name).write_bytes((aot.PACKAGE / name).read_bytes())
    monkeypatch.setattr(aot, "PACKAGE", tmp_path)
    key = aot.source_key()
    (tmp_path / "kernels.py").write_bytes((tmp_path / "kernels.py").read_bytes() + b"\n# changed\n")
    assert aot.source_key() != key
    assert aot.load(tmp_path) is None


def test_kernel_choice_is_validated_and_missing_build_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "_live", None)
    monkeypatch.setenv("ENERGY_AGENT_KERNEL", "llvm")
    with pytest.raises(ValueError, match="ENERGY_AGENT_KERNEL must be auto, aot or jit"):
        energy.live_kernel()
    monkeypatch.setenv("ENERGY_AGENT_KERNEL", "aot")
    monkeypatch.setattr(aot, "AOT_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="energy-agent kernels build"):
        energy.live_kernel()
    monkeypatch.setenv("ENERGY_AGENT_KERNEL", "jit")
    assert energy.live_kernel() is kernels.job_energy and energy.live_kind == "numba JIT"
    monkeypatch.setattr(energy, "_live", None)  # the next test picks again


def test_kernels_status_names_the_build(built):
    r = subprocess.run([sys.executable, "-m", "agent.cli", "kernels", "status"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and aot.module_name() in r.stdout, r.stdout + r.stderr
