"""Simulated power meters: one Modbus TCP (or RTU-over-TCP) server, one unit id per machine.

Registers are computed when a request arrives, from the scenario clock: power and the energy
register (``offset + exact integral``) encoded as the meter's profile says (type, word and
byte order, scale), so a client reads exactly what the real meter would show at that instant.
Faults of the scenario are applied here: a silent meter does not answer, a failing one answers
with an exception code, a reset counter restarts from zero, a bad power register reads NaN.
"""

from __future__ import annotations

import asyncio
import logging
import math
from functools import partial

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.clock import Clock
from drivers import codec
from drivers.profile import MeterProfile, load_profile
from simulators.scenario import MachineSim, Scenario, Timeline

log = logging.getLogger(__name__)

NOMINAL_V = 230.0
POWER_FACTOR = 0.9
FREQUENCY_HZ = 50.0


def meter_values(m: MachineSim, tl: Timeline, faults: list, t: float) -> dict[str, float]:
    """What the meter shows at scenario time t (faults applied)."""
    p = tl.power_at(t)
    e = tl.counter_kwh(t)
    for f in faults:
        if f.kind == "counter_reset" and f.active(t):
            e -= tl.counter_kwh(f.from_s)
        if f.kind == "power_nan" and f.active(t):
            p = math.nan
    current = (p / (3 * NOMINAL_V * POWER_FACTOR)) if math.isfinite(p) else math.nan
    return {
        "power_w": p, "energy_import_kwh": e, "energy_export_kwh": 0.0,
        "voltage_l1_v": NOMINAL_V, "voltage_l2_v": NOMINAL_V, "voltage_l3_v": NOMINAL_V,
        "current_l1_a": current, "current_l2_a": current, "current_l3_a": current,
        "power_factor": POWER_FACTOR, "frequency_hz": FREQUENCY_HZ,
    }


def encode_point(profile: MeterProfile, quantity: str, value: float) -> list[int]:
    p = profile.points[quantity]
    wo, bo = profile.order(quantity)
    raw = (value - p.offset) / p.scale
    if p.type[0] in "ui":
        if not math.isfinite(raw):
            raw = 0
        # Counters truncate like a real register (never show energy not yet accumulated).
        raw = math.floor(raw + 1e-9) if quantity.startswith("energy") else round(raw)
    return codec.encode(raw, p.type, wo, bo)


class MeterBank:
    """Serves every meter of a scenario on one port."""

    def __init__(self, scenario: Scenario, clock: Clock, *, host: str = "127.0.0.1", port: int = 5020,
                 framer: str = "tcp", serial_device: str | None = None, baudrate: int = 9600):
        self.scenario = scenario
        self.clock = clock
        self.host, self.port = host, port
        self.profiles: dict[int, MeterProfile] = {}
        self.requests = 0
        devices = []
        for m in scenario.machines:
            prof = load_profile(m.meter.profile)
            self.profiles[m.meter.unit_id] = prof
            size = max(p.address + codec.width(p.type) for p in prof.points.values()) + 1
            devices.append(SimDevice(id=m.meter.unit_id,
                                     simdata=[SimData(address=0, count=size, datatype=DataType.REGISTERS)],
                                     action=partial(self._action, m)))
        if serial_device is not None:
            # Unknown units answer exception code 4 (pymodbus' simulator cannot stay silent for
            # them); a silent meter is the meter_silent fault.
            self.server = ModbusSerialServer(devices, port=serial_device, framer=FramerType.RTU, baudrate=baudrate)
        else:
            self.server = ModbusTcpServer(devices, address=(host, port), ignore_missing_devices=False,
                                          framer=FramerType.SOCKET if framer == "tcp" else FramerType.RTU)

    def sim_time(self) -> float:
        return self.clock.wall() - self.clock.anchor

    async def _action(self, m: MachineSim, fc: int, start: int, address: int, count: int,
                      regs: list[int], values) -> ExcCodes | None:
        self.requests += 1
        if values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # meters are read-only here
        t = self.sim_time()
        faults = [f for f in self.scenario.faults if f.machine == m.id]
        for f in faults:
            if f.active(t) and f.kind == "meter_silent":
                # No answer: hold the request past any client timeout (bounded).
                assert f.to_s is not None
                await asyncio.sleep(min(10.0, self.clock.real_seconds(f.to_s - t)))
                return ExcCodes.GATEWAY_NO_RESPONSE
            if f.active(t) and f.kind == "modbus_exception":
                return ExcCodes.DEVICE_FAILURE
        prof = self.profiles[m.meter.unit_id]
        function = "input" if fc == 4 else "holding"
        shown = None
        for q, p in prof.points.items():
            w = codec.width(p.type)
            if p.function != function or p.address + w <= address or p.address >= address + count:
                continue
            if shown is None:
                shown = meter_values(m, self.scenario.timelines[m.id], faults, t)
            for i, word in enumerate(encode_point(prof, q, shown[q])):
                regs[p.address + i - start] = word
        return None

    async def start(self) -> None:
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        await self.server.shutdown()
