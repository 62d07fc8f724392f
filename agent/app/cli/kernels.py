"""``kernels build``: compile the energy kernels into numba's cache ahead of the agent."""

from __future__ import annotations

import argparse
import time

from energy_agent.app.cli.common import EXIT_OK, add_command


def register(commands) -> None:
    s = add_command(commands, "kernels", cmd_kernels,
                    "compile the energy kernels into numba's cache (done by make at install)")
    s.add_argument("action", choices=["build"], help="build: compile every kernel now, so the agent only loads them")


def cmd_kernels(args: argparse.Namespace) -> int:
    from energy_agent.domain import energy

    started = time.perf_counter()
    energy.warm_up()
    energy.warm_up_batch()
    print(f"kernels compiled into numba's cache (or loaded from it) in {time.perf_counter() - started:.1f} s")
    return EXIT_OK
