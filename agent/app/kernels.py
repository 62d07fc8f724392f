"""The energy kernels in a child process, so that the agent process never loads numba and LLVM.

numba's LLVM library costs a process about 110 MB of memory once imported, more than the rest
of a gateway's agent together. The agent computes a finished span's energy about once a
minute per machine: :class:`KernelWorker` runs ``energy_agent.domain.energy.compute_job`` in a
child process (spawned, so nothing of the agent's threads or sockets is inherited) that loads
the kernels from numba's cache once, and calls it over a pipe: about a millisecond per span,
the same function, bit-identical results. A worker that dies is started again, once per call;
an exception raised by the kernel's input checks comes back as itself.

The first call waits until the worker has loaded the kernels (about 1.5 s after start, or the
compile time when numba's cache is empty: `energy-agent kernels build` fills it at install).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from energy_agent.core.errors import AgentError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
"""How long a call waits for a worker to load (or compile) the kernels."""


def _serve(conn: Connection) -> None:
    """The child: load the kernels, then compute each job sent until the pipe closes."""
    from energy_agent.domain import energy

    started = time.perf_counter()
    energy.warm_up()
    conn.send(("ready", time.perf_counter() - started))
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", energy.compute_job(*args)))
        except (ValueError, TypeError) as exc:  # the input checks: the caller's mistake, sent back
            conn.send(("error", exc))


class KernelWorker:
    """``compute_job`` in a child process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ready = False
        self.load_s: float | None = None
        """Seconds the last worker took to load the kernels."""
        self.pid: int | None = None

    def start(self) -> None:
        """Spawn the worker; it loads the kernels while the agent goes on."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child,), name="energy-agent-kernels", daemon=True)
        proc.start()
        child.close()
        self._conn, self._proc, self._ready, self.pid = parent, proc, False, proc.pid

    def _wait_ready(self) -> None:
        assert self._conn is not None
        if self._ready:
            return
        if not self._conn.poll(READY_TIMEOUT_S):
            raise AgentError(f"the kernel worker did not load the kernels within {READY_TIMEOUT_S:g} s")
        kind, seconds = self._conn.recv()
        if kind != "ready":
            raise AgentError(f"the kernel worker sent {kind!r} instead of 'ready'")
        self._ready, self.load_s = True, float(seconds)
        log.info("kernels loaded in a worker process (pid %s) in %.2f s", self.pid, seconds)

    def wait_ready(self) -> float:
        """Block until the worker has loaded the kernels; the seconds it took."""
        with self._lock:
            if self._conn is None:
                self.start()
            self._wait_ready()
            assert self.load_s is not None
            return self.load_s

    def compute_job(self, *args: Any) -> Any:
        """``energy_agent.domain.energy.compute_job(*args)``, computed by the worker."""
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None:
                    self.start()
                try:
                    self._wait_ready()
                    assert self._conn is not None
                    self._conn.send(args)
                    kind, value = self._conn.recv()
                except (EOFError, OSError, BrokenPipeError) as exc:
                    code = self._proc.exitcode if self._proc is not None else None
                    log.error("the kernel worker (pid %s) is gone (exit code %s: %s); starting another",
                              self.pid, code, exc)
                    self._stop()
                    if attempt == 2:
                        raise AgentError(f"the kernel worker died twice in a row ({exc})") from exc
                    continue
                if kind == "error":
                    raise value
                return value
        raise AssertionError("unreachable")

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._conn = self._proc = None
        self._ready = False

    def close(self) -> None:
        with self._lock:
            self._stop()
