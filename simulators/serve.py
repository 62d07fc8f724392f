"""``energy-agent simulate``: serve a scenario's meters and CNCs, or print its truth.

The CLI wires :func:`add_arguments` into its ``simulate`` sub-command and runs
``asyncio.run(run(args))``. :func:`serve` is the library entry (tests, other tools).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from energy_agent.core.clock import Clock
from energy_agent.core.errors import AgentError, ConfigError
from energy_agent.simulators import scenario as scn

if TYPE_CHECKING:  # the servers' libraries load only when serving (the CLI builds its parser with this module)
    from energy_agent.simulators.cnc import CncBank
    from energy_agent.simulators.meter import MeterBank

log = logging.getLogger(__name__)

READY = "simulators ready:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario .yaml")
    p.add_argument("--host", default="127.0.0.1", help="address both servers listen on (default 127.0.0.1)")
    p.add_argument("--modbus-port", type=int, default=5020, help="Modbus port; 0 picks a free one (default 5020)")
    p.add_argument("--modbus-framer", choices=["tcp", "rtu-over-tcp"], default="tcp",
                   help="tcp (Modbus TCP, the default) or rtu-over-tcp (RTU frames, as behind an RS-485 gateway)")
    p.add_argument("--modbus-serial", default=None, metavar="DEVICE",
                   help="serve the meters as RTU on this serial device instead of TCP")
    p.add_argument("--baudrate", type=int, default=9600, help="with --modbus-serial (default 9600)")
    p.add_argument("--opcua-port", type=int, default=4840, help="OPC UA port; 0 picks a free one (default 4840)")
    p.add_argument("--speed", type=float, default=None, help="override the scenario's speed")
    p.add_argument("--anchor", default=None, help="wall time (ISO 8601) of scenario time 0; default: now")
    p.add_argument("--truth", action="store_true", help="print every job's exact energy as JSON and exit")
    p.add_argument("--until-end", action="store_true", help="stop when the scenario is over (plus --grace)")
    p.add_argument("--grace", type=float, default=0.0, metavar="S",
                   help="with --until-end: keep serving S scenario seconds after the end (default 0)")


def parse_anchor(text: str | None) -> float:
    """ISO 8601 (naive = UTC) to epoch seconds; now when not given."""
    if not text:
        return time.time()
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--anchor: {text!r} is not an ISO 8601 time") from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def ready_line(s: scn.Scenario, clock: Clock, meters: MeterBank, cncs: CncBank) -> str:
    units = ",".join(str(u) for u in meters.units)
    anchor = datetime.fromtimestamp(clock.anchor, timezone.utc).isoformat().replace("+00:00", "Z")
    return (f"{READY} modbus {meters.where} units {units}; "
            f"opcua {cncs.endpoint}; scenario {s.name}: {len(s.machines)} machines, "
            f"{sum(len(m.jobs) for m in s.machines)} jobs, speed {clock.speed:g}, anchor {anchor}, "
            f"now t={clock.wall() - clock.anchor:.1f} s of {s.duration_s:g} s")


async def serve(s: scn.Scenario, clock: Clock, host: str = "127.0.0.1", modbus_port: int = 5020,
                opcua_port: int = 4840, stop_event: asyncio.Event | None = None, *, framer: str = "tcp",
                until_end: bool = False, grace_s: float = 0.0, serial_device: str | None = None,
                baudrate: int = 9600, ready: Callable[[str], None] | None = None) -> None:
    """Serve the meters (Modbus) and CNCs (OPC UA) of ``s`` on ``clock`` until ``stop_event`` is
    set or, with ``until_end``, until scenario time ``duration_s + grace_s``. Port 0 picks a free
    port; ``serial_device`` serves the meters as RTU on a serial line instead of TCP. ``ready``
    gets the one-line ready message (default: printed to stdout and flushed)."""
    from energy_agent.simulators.cnc import CncBank
    from energy_agent.simulators.meter import MeterBank

    stop_event = stop_event or asyncio.Event()
    meters = MeterBank(s, clock, host=host, port=modbus_port, framer=framer, serial_device=serial_device,
                       baudrate=baudrate)
    cncs = CncBank(s, clock, host=host, port=opcua_port)
    await meters.start()
    try:
        await cncs.start()
        try:
            line = ready_line(s, clock, meters, cncs)
            if ready is None:
                print(line, flush=True)
            else:
                ready(line)
            if until_end:
                end = s.duration_s + grace_s
                while not stop_event.is_set():
                    left = end - (clock.wall() - clock.anchor)
                    if left <= 0:
                        break
                    try:
                        await asyncio.wait_for(stop_event.wait(), min(0.5, clock.real_seconds(left)))
                    except asyncio.TimeoutError:
                        pass
            else:
                await stop_event.wait()
        finally:
            await cncs.stop()
    finally:
        await meters.stop()


async def run(args: argparse.Namespace) -> int:
    """The ``simulate`` command: exit code 0 (ConfigError propagates to the CLI)."""
    s = scn.load(args.scenario)
    if args.truth:
        json.dump(scn.truth(s), sys.stdout, indent=1)
        print(flush=True)
        return 0
    speed = s.speed if args.speed is None else args.speed
    if not speed > 0:
        raise ConfigError(f"--speed: {speed:g} must be > 0")
    clock = Clock(speed, parse_anchor(args.anchor))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(s, clock, args.host, args.modbus_port, args.opcua_port, stop, framer=args.modbus_framer,
                    until_end=args.until_end, grace_s=args.grace, serial_device=args.modbus_serial,
                    baudrate=args.baudrate)
    except (OSError, RuntimeError) as exc:  # a port in use, an address not available
        raise AgentError(f"simulate: cannot serve: {exc}") from exc
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m energy_agent.simulators.serve SCENARIO ...``)."""
    p = argparse.ArgumentParser(prog="energy_agent.simulators.serve", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
