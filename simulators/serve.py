"""``energy-agent simulate``: serve a scenario's meters and CNCs, or print its truth."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from datetime import datetime

from agent.clock import Clock
from agent.errors import ConfigError
from simulators import scenario as scn
from simulators.cnc import CncBank
from simulators.meter import MeterBank

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario .yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--modbus-port", type=int, default=5020)
    p.add_argument("--modbus-framer", choices=["tcp", "rtu-over-tcp"], default="tcp")
    p.add_argument("--modbus-serial", default=None, metavar="DEVICE",
                   help="serve the meters as RTU on this serial device instead of TCP")
    p.add_argument("--baudrate", type=int, default=9600)
    p.add_argument("--opcua-port", type=int, default=4840)
    p.add_argument("--speed", type=float, default=None, help="override the scenario's speed")
    p.add_argument("--anchor", default=None, help="wall time (ISO 8601) of scenario time 0; default: now")
    p.add_argument("--truth", action="store_true", help="print every job's exact energy as JSON and exit")
    p.add_argument("--until-end", action="store_true", help="stop when the scenario is over")


def _anchor(text: str | None) -> float:
    if not text:
        return time.time()
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ConfigError(f"--anchor: {text!r} is not an ISO 8601 time") from None


async def serve(s: scn.Scenario, clock: Clock, *, host: str, modbus_port: int, opcua_port: int,
                framer: str, stop: asyncio.Event, until_end: bool = False, serial_device: str | None = None,
                baudrate: int = 9600) -> None:
    meters = MeterBank(s, clock, host=host, port=modbus_port, framer=framer, serial_device=serial_device,
                       baudrate=baudrate)
    cncs = CncBank(s, clock, host=host, port=opcua_port)
    await meters.start()
    try:
        await cncs.start()
        try:
            units = ",".join(str(m.meter.unit_id) for m in s.machines)
            where = f"rtu {serial_device}@{baudrate}" if serial_device else f"{framer} {host}:{modbus_port}"
            print(f"simulators ready: modbus {where} units {units}; opcua {cncs.endpoint}; "
                  f"{len(s.machines)} machines at {clock.speed:g}x", flush=True)
            if until_end:
                end = clock.anchor + s.duration_s
                while not stop.is_set() and clock.wall() < end:
                    try:
                        await asyncio.wait_for(stop.wait(), 0.5)
                    except asyncio.TimeoutError:
                        pass
            else:
                await stop.wait()
        finally:
            await cncs.stop()
    finally:
        await meters.stop()


async def run(args: argparse.Namespace) -> int:
    s = scn.load(args.scenario)
    if args.truth:
        print(json.dumps(scn.truth(s), indent=1))
        return 0
    speed = args.speed or s.speed
    clock = Clock(speed, _anchor(args.anchor))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(s, clock, host=args.host, modbus_port=args.modbus_port, opcua_port=args.opcua_port,
                framer=args.modbus_framer, stop=stop, until_end=args.until_end,
                serial_device=args.modbus_serial, baudrate=args.baudrate)
    return 0
