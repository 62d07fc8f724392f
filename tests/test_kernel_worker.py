"""The agent computes span energy in a kernel worker process: the same results bit for bit,
no numba or LLVM in the agent's own process, a dead worker replaced."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from energy_agent.app.kernels import KernelWorker
from energy_agent.domain.energy import compute_job


def _job(rng):
    t = np.cumsum(rng.uniform(0.5, 2.0, 400))
    p = rng.uniform(500, 9000, 400)
    e = 1000.0 + np.concatenate([[0.0], np.cumsum(p[1:] * np.diff(t) / 3.6e6)])
    e[rng.integers(0, 400, 5)] = np.nan
    st_t = np.sort(rng.uniform(t[0], t[-1], 12))
    st_s = rng.integers(0, 6, 12).astype(np.uint8)
    return t, e, p, st_t, st_s, float(t[20]) + 0.3, float(t[380]) - 0.2, 5.0, 0.0, 20000.0


@pytest.fixture(scope="module")
def worker():
    w = KernelWorker()
    w.start()
    yield w
    w.close()


def test_the_worker_gives_the_kernels_results_bit_for_bit(worker):
    rng = np.random.default_rng(7)
    for _ in range(20):
        args = _job(rng)
        assert worker.compute_job(*args) == compute_job(*args)  # floats compared exactly


def test_input_errors_come_back_as_themselves(worker):
    t = np.array([0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        worker.compute_job(t, t, t, t[:1], np.zeros(1, np.uint8), 0.0, 1.0, 5.0)


def test_a_dead_worker_is_replaced(worker):
    args = _job(np.random.default_rng(1))
    worker.compute_job(*args)
    old = worker.pid
    os.kill(old, signal.SIGKILL)
    assert worker.compute_job(*args) == compute_job(*args)
    assert worker.pid != old


def test_the_agent_process_never_imports_numba(tmp_path):
    code = """
import asyncio, sys, yaml
from energy_agent.app import config
from energy_agent.app.runtime import Agent
from tests import factories
cfg = yaml.safe_load(open("config/demo.yaml"))
cfg["ledger"] = {"path": sys.argv[1]}
agent = Agent(config.parse(cfg, "."))
p = factories.pending_job()
energy = agent.kernels.compute_job(*p.inputs.args())
agent.kernels.close()
assert abs(energy.kwh - 1.25) < 1e-9, energy
print(sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "llvmlite")))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ledger.db")], capture_output=True, text=True,
                         timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
