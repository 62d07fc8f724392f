"""Simulated power meters: one Modbus server, one unit id per machine: TCP, RTU-over-TCP, or
RTU on a serial line (several meters on one RS-485 line).

Each meter is a pymodbus ``SimDevice`` with separate holding and input register blocks that
cover exactly the address range of its profile's points of that function (reads outside it, or
of a function the profile does not use, get exception 2, illegal address, like a real meter;
writes are refused the same way). Inside that range a lenient meter (the default) reads the
registers between points as whatever the block holds; a ``strict`` one answers exception 2 to
any read touching a register no point occupies, as Eastron SDM meters do. The device's action runs when a request arrives: it takes
scenario time from the clock (``clock.wall() - clock.anchor``), computes what the meter shows
at that instant (power and the closed-form energy register, plus voltage, current, power
factor and frequency where the profile maps them) and writes the encoded registers in place,
as the profile says (type, word and byte order, ``raw = (value - offset) / scale``; integer
counters are floored, other integers rounded to nearest). So a client reads exactly what the
real meter would show at the moment its request is served.

Faults of the scenario act in one place per layer: on values and answers in
:func:`apply_faults`, on the listener (``listener_down``: closed with its connections, reopened
on the same port) in :meth:`MeterBank._listener_faults`. A silent meter sends no answer
at all (the action raises ``NoSuchIdException`` and the server runs with
``ignore_missing_devices=True``, which drops the response): the client's request times out
while other units on the same connection keep answering. Damaged frames are beyond what the
server can send: with a ``modbus_garbled`` fault in the scenario the bank serves its TCP port
through :class:`energy_agent.simulators.garble.GarblingProxy`, which damages the responses of the faulty
unit inside the fault's window on their way to the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
from functools import partial
from typing import Any

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from energy_agent.core.clock import Clock
from energy_agent.drivers import codec
from energy_agent.drivers.profile import MeterProfile, RegisterPoint
from energy_agent.simulators.garble import GarblingProxy
from energy_agent.simulators.scenario import Fault, MachineSim, Scenario

log = logging.getLogger(__name__)

NOMINAL_V = 230.0
POWER_FACTOR = 0.9
FREQUENCY_HZ = 50.0
FRAMERS = {"tcp": FramerType.SOCKET, "rtu-over-tcp": FramerType.RTU, "rtu": FramerType.RTU}
FC_FUNCTION = {3: "holding", 4: "input"}
REFUSING = ("meter_silent", "modbus_exception", "modbus_garbled", "listener_down")
"""Fault kinds that refuse or lose requests rather than change values."""
LISTENER_TICK_S = 0.005
"""How often (real seconds) the bank checks the scenario clock for ``listener_down`` faults."""


class NoAnswer(NoSuchIdException):
    """Raised by a device action to send no response (the server ignores 'missing' devices)."""


def physical_values(machine: MachineSim, t: float) -> dict[str, float]:
    """What a healthy meter shows at scenario time t: every quantity a profile may map."""
    tl = machine.timeline
    p = tl.power_at(t)
    current = p / (3 * NOMINAL_V * POWER_FACTOR)
    return {
        "power_w": p, "energy_import_kwh": tl.energy_at(t), "energy_export_kwh": 0.0,
        "voltage_l1_v": NOMINAL_V, "voltage_l2_v": NOMINAL_V, "voltage_l3_v": NOMINAL_V,
        "current_l1_a": current, "current_l2_a": current, "current_l3_a": current,
        "power_factor": POWER_FACTOR, "frequency_hz": FREQUENCY_HZ,
    }


def apply_faults(machine: MachineSim, faults: list[Fault], t: float, values: dict[str, float]) -> ExcCodes | None:
    """Apply the meter faults active at t to one request: the one place meter faults act.

    Raises :class:`NoAnswer` (no response is sent), returns an exception code to answer with,
    or changes ``values`` in place and returns None. ``faults`` are in order of ``from_s``;
    the earliest active fault that refuses the request wins, and of several counter resets the
    latest counts (a counter jump after a reset adds its step to the reset register).
    ``modbus_garbled`` acts on the wire (:mod:`energy_agent.simulators.garble`), not here.
    """
    for f in faults:
        if not f.active(t):
            continue
        if f.kind == "meter_silent":
            raise NoAnswer(f"{machine.id}: meter_silent")
        if f.kind == "modbus_exception":
            return ExcCodes(f.code or ExcCodes.DEVICE_FAILURE)
        if f.kind == "counter_reset":
            values["energy_import_kwh"] = machine.timeline.energy_at(t) - machine.timeline.energy_at(f.from_s)
        elif f.kind == "counter_jump":
            values["energy_import_kwh"] += f.kwh
        elif f.kind == "counter_freeze":
            # what the register showed when it froze, with the faults of before applied
            earlier = [g for g in faults if g is not f and g.from_s <= f.from_s]
            values["energy_import_kwh"] = meter_values(machine, f.from_s, earlier)["energy_import_kwh"]
        elif f.kind == "counter_nan":
            values["energy_import_kwh"] = math.nan
        elif f.kind in ("power_nan", "power_inf"):
            bad = math.nan if f.kind == "power_nan" else math.inf
            values["power_w"] = bad
            for q in ("current_l1_a", "current_l2_a", "current_l3_a"):
                values[q] = bad
        elif f.kind == "power_negative":
            values["power_w"] = -abs(values["power_w"])
        elif f.kind == "power_implausible":
            limit = machine.meter.profile_model.max_power_w or 0.0  # validated: set when value_w is not
            values["power_w"] = f.value_w if f.value_w is not None else 2.0 * limit
    return None


def meter_values(machine: MachineSim, t: float, faults: list[Fault] = ()) -> dict[str, float]:
    """What the meter shows at t with value faults applied (refusing faults are ignored here)."""
    values = physical_values(machine, t)
    value_faults = [f for f in faults if f.kind not in REFUSING]
    apply_faults(machine, value_faults, t, values)
    return values


def _int_range(type_: str) -> tuple[int, int]:
    bits = 16 * codec.width(type_)
    return (0, 2**bits - 1) if type_[0] == "u" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def encode_value(point: RegisterPoint, value: float, word_order: str, byte_order: str, *, counter: bool) -> list[int]:
    """Registers of one point showing ``value`` (in the quantity's unit)."""
    raw = (value - point.offset) / point.scale
    if point.type[0] in "ui":
        lo, hi = _int_range(point.type)
        if not math.isfinite(raw):
            raw = lo if point.type[0] == "i" else hi  # 'not available': 0x8000… signed, 0xFFFF… unsigned
        elif counter:
            # A counter register never shows energy not yet accumulated; the tiny allowance keeps
            # a value that is an exact multiple of the step (802.25 kWh = 802250 Wh) from
            # flooring one step low through binary rounding.
            raw = math.floor(raw + abs(raw) * 1e-12 + 1e-9)
        else:
            raw = math.floor(raw + 0.5)
        raw = min(max(raw, lo), hi)
    return codec.encode(raw, point.type, word_order, byte_order)  # type: ignore[arg-type]


def encode_point(profile: MeterProfile, quantity: str, value: float) -> list[int]:
    wo, bo = profile.order(quantity)
    return encode_value(profile.points[quantity], value, wo, bo, counter=quantity.startswith("energy"))


def mapped_registers(profile: MeterProfile) -> dict[str, frozenset[int]]:
    """Per register function, the addresses a point of the profile occupies."""
    out: dict[str, set[int]] = {"holding": set(), "input": set()}
    for p in profile.points.values():
        out[p.function].update(range(p.address, p.address + codec.width(p.type)))
    return {fn: frozenset(regs) for fn, regs in out.items()}


def register_blocks(profile: MeterProfile) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    """(coils, discrete inputs, holding, input) for a SimDevice with separate blocks: each
    register function covers its points' address range; an unused function has no valid address."""
    blocks: dict[str, list[SimData]] = {}
    for fn in ("holding", "input"):
        spans = [(p.address, p.address + codec.width(p.type)) for p in profile.points.values() if p.function == fn]
        if spans:
            lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
            blocks[fn] = [SimData(lo, count=hi - lo, datatype=DataType.REGISTERS, readonly=True)]
        else:
            blocks[fn] = [SimData(0, datatype=DataType.INVALID)]
    # pymodbus needs one entry per bit block; a meter has no coils: 16 read-only zeros.
    bits = [SimData(0, datatype=DataType.BITS, readonly=True)]
    return bits, list(bits), blocks["holding"], blocks["input"]


class MeterBank:
    """Serves every meter of a scenario on one port (TCP or RTU-over-TCP framing; port 0 binds a
    free one, kept when a ``listener_down`` fault reopens the listener) or, with
    ``serial_device``, as RTU on that serial line."""

    def __init__(self, scenario: Scenario, clock: Clock, *, host: str = "127.0.0.1", port: int = 5020,
                 framer: str = "tcp", serial_device: str | None = None, baudrate: int = 9600):
        if serial_device is not None:
            framer = "rtu"
        if framer not in FRAMERS:
            raise ValueError(f"framer {framer!r}: expected one of {', '.join(FRAMERS)}")
        self.scenario = scenario
        self.clock = clock
        self.host = host
        self._port = port
        self.framer = framer
        self.serial_device, self.baudrate = serial_device, baudrate
        self.requests = 0
        self.refused_strict = 0
        """Reads a strict meter refused because they touched an unmapped register."""
        self.proxy: GarblingProxy | None = None
        """In front of the server when the scenario damages frames (``modbus_garbled``)."""
        garbled = [f for f in scenario.faults if f.kind == "modbus_garbled"]
        self._listener_down = [f for f in scenario.faults if f.kind == "listener_down"]
        for kind, faults in (("modbus_garbled", garbled), ("listener_down", self._listener_down)):
            if faults and serial_device is not None:
                raise ValueError(f"{kind} faults ({faults[0].machine}) need a TCP port, not a serial line")
        self.profiles: dict[int, MeterProfile] = {}
        self._devices = []
        for m in scenario.machines:
            prof = m.meter.profile_model
            self.profiles[m.meter.unit_id] = prof
            mapped = mapped_registers(prof) if m.meter.strict else None
            self._devices.append(SimDevice(id=m.meter.unit_id, simdata=register_blocks(prof),
                                           action=partial(self._action, m, prof, scenario.faults_of(m.id, "meter"),
                                                          mapped)))
        self.server: ModbusTcpServer | ModbusSerialServer
        if serial_device is not None:
            self.server = ModbusSerialServer(self._devices, port=serial_device, framer=FramerType.RTU,
                                             baudrate=baudrate, ignore_missing_devices=True)
        else:
            if garbled:  # the server on a free port behind the proxy, which takes the bank's port
                self.proxy = GarblingProxy(scenario, clock, framer, host=host, port=port)
            self.server = self._tcp_server(0 if garbled else port)
        self._started = False
        self._open = False
        self._watch: asyncio.Task | None = None
        self.listener_changes = 0
        """How often a ``listener_down`` fault closed or reopened the listener."""

    def _tcp_server(self, port: int) -> ModbusTcpServer:
        # ignore_missing_devices lets NoAnswer drop a response. A unit id no meter has still gets
        # exception code 4: pymodbus' simulator answers it (not a NoSuchIdException).
        return ModbusTcpServer(self._devices, address=(self.host, port), framer=FRAMERS[self.framer],
                               ignore_missing_devices=True)

    @property
    def units(self) -> list[int]:
        return [m.meter.unit_id for m in self.scenario.machines]

    @property
    def port(self) -> int:
        """The listening port (the bound one when started on port 0); 0 on a serial line."""
        if self.serial_device is not None:
            return 0
        if self.proxy is not None:
            return self.proxy.port
        return self.server_port

    @property
    def server_port(self) -> int:
        """The Modbus server's own port (behind the proxy, when there is one)."""
        if self._started and self.server.transport is not None:
            return self.server.transport.sockets[0].getsockname()[1]
        return self._port

    @property
    def listening(self) -> bool:
        """Whether clients can connect now (False while a ``listener_down`` fault holds)."""
        return self._open

    @property
    def where(self) -> str:
        """Where the meters answer, for messages."""
        if self.serial_device is not None:
            return f"{self.serial_device} (rtu, {self.baudrate} baud)"
        return f"{self.host}:{self.port} ({self.framer})"

    def sim_time(self) -> float:
        return self.clock.wall() - self.clock.anchor

    async def _action(self, m: MachineSim, prof: MeterProfile, faults: list[Fault],
                      mapped: dict[str, frozenset[int]] | None, fc: int, start: int,
                      address: int, count: int, regs: list[int], values: Any) -> ExcCodes | None:
        self.requests += 1
        t = self.sim_time()
        shown = physical_values(m, t)
        refused = apply_faults(m, faults, t, shown)
        if refused is not None:
            return refused
        function = FC_FUNCTION.get(fc)
        if function is None:
            return None
        if mapped is not None and not mapped[function].issuperset(range(address, address + count)):
            self.refused_strict += 1
            return ExcCodes.ILLEGAL_ADDRESS
        for q, p in prof.points.items():
            # regs is the whole block of this function; regs[0] is register ``start``.
            if p.function != function or p.address + codec.width(p.type) <= address or p.address >= address + count:
                continue
            for i, word in enumerate(encode_point(prof, q, shown[q])):
                regs[p.address - start + i] = word
        return None

    async def _open_listener(self) -> None:
        if self.proxy is not None:
            await self.proxy.start(self.host, self.server_port)
        else:
            await self.server.serve_forever(background=True)
            if self._port == 0 and self.serial_device is None:
                self._port = self.server_port  # a reopened listener takes the same port
        self._open = True

    async def _close_listener(self) -> None:
        """Stop listening and drop every open connection (the proxy's, when there is one)."""
        self._open = False
        if self.proxy is not None:
            await self.proxy.stop()
        else:
            await self.server.shutdown()
            self.server = self._tcp_server(self._port)  # ready to listen again on the same port

    async def _listener_faults(self) -> None:
        """Close and reopen the listener as the ``listener_down`` faults say, on scenario time."""
        while True:
            t = self.sim_time()
            down = any(f.active(t) for f in self._listener_down)
            try:
                if down and self._open:
                    await self._close_listener()
                    self.listener_changes += 1
                elif not down and not self._open:
                    await self._open_listener()
                    self.listener_changes += 1
            except (OSError, RuntimeError) as exc:  # the port taken meanwhile: try again next tick
                log.warning("meter bank %s: cannot reopen the listener: %s", self.where, exc)
            await asyncio.sleep(LISTENER_TICK_S)

    async def start(self) -> None:
        if self.proxy is not None:
            await self.server.serve_forever(background=True)
        self._started = True
        await self._open_listener()  # binds the port (a free one for port 0) even if a fault closes it at once
        if any(f.active(self.sim_time()) for f in self._listener_down):
            await self._close_listener()
        if self._listener_down:
            self._watch = asyncio.create_task(self._listener_faults(), name=f"meter bank {self.where} listener")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self.proxy is not None:
            await self.proxy.stop()
        await self.server.shutdown()
        self._started = self._open = False

    async def __aenter__(self) -> MeterBank:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
