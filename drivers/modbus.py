"""Modbus meters: one bus object per physical connection, one driver per meter.

A :class:`ModbusBus` owns the connection of one TCP socket, RTU-over-TCP gateway or local
serial line. Meters behind it share it; an ``asyncio.Lock`` serialises their requests (an
RS-485 line answers one request at a time) and a meter may ask for a quiet pause after each of
its requests.

The bus, not pymodbus, decides whether the connection is usable. pymodbus runs with no timeout
of its own, no retries and no automatic reconnect; the bus puts its own deadline on every
connect and request. After a timeout or any transport error the connection is closed and the
client thrown away: the next request goes out on a new client and a new connection, so nothing
of a failed exchange (a late answer, a half-closed socket, a transport pymodbus still counts as
connected) is ever reused. A connect that fails, or a connection that closes before its first
answer, pushes the next attempt back exponentially (capped); until then requests fail at once,
so a dead meter costs one connect attempt per backoff step, not one per poll. The first answer
on a connection clears the backoff.

``client.connected`` is believed only when it says no. pymodbus 3.16 can report a connection
as connected after the peer reset it during the connect (a listener closing with connections in
its backlog): asyncio reports the loss, then pymodbus stores the dead transport. Nothing in the
public API tells that state apart, and a request on it goes nowhere; so it costs one timeout,
after which the connection is dropped like any other. After a meter's listener comes back,
every meter behind the bus reads again within backoff_max + timeout + the time to its next two
polls (``tests/test_modbus_reconnect.py`` measures it over hundreds of drops).

A :class:`MeterDriver` reads the registers its profile names in as few requests as the
profile allows (coalesced blocks), decodes them and returns a :class:`Reading`. A meter that
answers exception 2 or 3 to a coalesced request is tried again with the block split (its runs
of adjacent points, then its points one by one); what it accepts becomes this meter's plan for
every later poll, logged once. Exception 2 to a single point's own request is a wrong map and
fails the poll naming the point. Values that cannot be measurements are reported in
``Reading.bad`` (with the reason in ``Reading.reasons``), never passed on as numbers: NaN or
infinity, an integer register's 'not available' marker, power above the profile's
``max_power_w`` or clearly negative. Damaged frames (pymodbus drops them and the request times
out; a response with fewer registers than asked) and exception responses make the whole poll an
error. pymodbus exceptions stay in this module: callers see :class:`DeviceError` or a Reading
with ``error`` set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from energy_agent.core.clock import Clock
from energy_agent.core.errors import DeviceError
from energy_agent.core.reading import Reading
from energy_agent.drivers import codec
from energy_agent.drivers.profile import Block, MeterProfile, decode_block, plan_blocks, split_block

log = logging.getLogger(__name__)

ENERGY_QUANTITIES = ("power_w", "energy_import_kwh")
"""What the agent reads on every poll; the rest of a profile is read by ``probe``."""

NEGATIVE_POWER_SHARE = 1e-3
NEGATIVE_POWER_MIN_W = 10.0
"""Power below -max(10 W, 0.1 % of max_power_w) is a reversed CT or a sign error, not a
consumer's: not used. A meter's noise around zero (an idle machine reading -0.4 W) stays above."""

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "server device failure",
    5: "acknowledge", 6: "server device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
"""Modbus Application Protocol v1.1b3, section 7."""

REFUSED_SPAN = (2, 3)
"""Exception codes with which meters refuse a request that spans registers they do not map
(or more values than they serve at once): the request is split, not repeated."""


class ExceptionResponseError(DeviceError):
    """The device answered with a Modbus exception response (``code``)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Split:
    """A coalesced request a meter refused (exception ``code``) and the requests read instead."""

    refused: Block
    code: int
    parts: tuple[Block, ...]

    def __str__(self) -> str:
        why = ("reads across unmapped registers refused" if self.refused.gaps
               else "reads of several values in one request refused")
        spans = ", ".join(b.span.split(" ", 1)[1] for b in self.parts)
        return (f"{why} (exception {self.code} reading {self.refused.span}); "
                f"reading {self.refused.function} {spans} separately")


def check_value(q: str, v: float, max_power_w: float | None) -> str | None:
    """Why a decoded value is not a measurement (a ``energy_agent.core.reading.BAD_REASONS`` code), or None."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    if q == "power_w":
        if max_power_w and v > max_power_w:
            return "implausible"
        if v < -max(NEGATIVE_POWER_MIN_W, NEGATIVE_POWER_SHARE * (max_power_w or 0.0)):
            return "negative"
    return None


class ModbusBus:
    """One Modbus connection shared by the devices behind it (see the module docstring)."""

    def __init__(self, host: str, port: int, *, framer: str = "tcp", timeout_s: float = 1.0,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, serial=None):
        # pymodbus: timeout=None (no timer of its own: every deadline is the bus's), retries=0
        # (a retry is the driver's decision), reconnect_delay=0 (no reconnect task: the bus
        # reconnects, with a new client).
        if serial is not None:
            self.name = f"rtu://{serial.device}@{serial.baudrate}{serial.parity}{serial.stopbits}"
            self._make = lambda: AsyncModbusSerialClient(
                serial.device, framer=FramerType.RTU, baudrate=serial.baudrate, parity=serial.parity,
                stopbits=serial.stopbits, bytesize=serial.bytesize, timeout=None, retries=0,
                reconnect_delay=0, reconnect_delay_max=0)
        else:
            self.name = f"{framer}://{host}:{port}"
            self._make = lambda: AsyncModbusTcpClient(
                host, port=port, framer=FramerType.SOCKET if framer == "tcp" else FramerType.RTU,
                timeout=None, retries=0, reconnect_delay=0, reconnect_delay_max=0)
        self._connect_timeout = timeout_s
        self._client = None
        self._answered = False
        """Whether the current connection has carried an answer (a response or an exception response)."""
        self._lock = asyncio.Lock()
        self._backoff_min, self._backoff_max = backoff_min_s, backoff_max_s
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._cause = ""

    @classmethod
    def for_meter(cls, dev) -> ModbusBus:
        """The bus of a configured meter (``energy_agent.app.config.MeterDevice``)."""
        return cls(dev.host or "", dev.port, framer=dev.transport, timeout_s=dev.timeout_s,
                   serial=dev.serial if dev.transport == "rtu" else None)

    def _drop(self, lost: bool) -> None:
        """Close the connection and forget its client. A connection ``lost`` (closed by the
        peer, a transport error) before its first answer counts as a failed connect: a listener
        that accepts and hangs up at once is not a meter back. A timeout does not: the unit
        asked may be silent while the others on the connection answer."""
        if self._client is None:
            return
        self._client.close()
        self._client = None
        if lost and not self._answered:
            self._failed_attempt("the connection closed before any answer")

    def _failed_attempt(self, cause: str) -> None:
        self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
        self._next_attempt = time.monotonic() + self._backoff
        self._cause = cause

    async def _ensure(self):
        if self._client is not None:
            if self._client.connected:
                return self._client
            self._drop(lost=True)  # closed by the peer since the last request
        now = time.monotonic()
        if now < self._next_attempt:
            raise DeviceError(f"{self.name}: cannot connect ({self._cause}); "
                              f"next attempt in {self._next_attempt - now:.1f} s")
        client = self._make()
        try:
            async with asyncio.timeout(self._connect_timeout):
                ok = await client.connect()
        except TimeoutError as exc:
            client.close()
            self._failed_attempt(f"no connection within {self._connect_timeout:g} s")
            raise DeviceError(f"{self.name}: cannot connect ({self._cause})") from exc
        except (OSError, ModbusException) as exc:
            client.close()
            self._failed_attempt(f"{type(exc).__name__}: {exc}")
            raise DeviceError(f"{self.name}: cannot connect ({self._cause})") from exc
        if not (ok and client.connected):
            client.close()
            self._failed_attempt("connection refused or closed")
            raise DeviceError(f"{self.name}: cannot connect ({self._cause})")
        self._client, self._answered = client, False
        return client

    async def read(self, unit: int, function: str, address: int, count: int, timeout_s: float,
                   pause_s: float = 0.0) -> list[int]:
        """Read ``count`` registers; DeviceError names the cause (timeout, exception code, ...);
        an exception response is an :class:`ExceptionResponseError` carrying its code."""
        async with self._lock:
            try:
                return await self._read(unit, function, address, count, timeout_s)
            finally:
                if pause_s:
                    await asyncio.sleep(pause_s)  # bus quiet time, still holding the line

    async def _read(self, unit: int, function: str, address: int, count: int, timeout_s: float) -> list[int]:
        client = await self._ensure()
        call = client.read_input_registers if function == "input" else client.read_holding_registers
        what = f"{function} {address}+{count}"
        try:
            async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
                rr = await call(address, count=count, device_id=unit)
        except TimeoutError as exc:
            # No answer, or one pymodbus dropped as damaged, or a connection that is gone
            # without pymodbus having noticed: whichever, this connection is done.
            self._drop(lost=False)
            raise DeviceError(f"{self.name} unit {unit}: no answer within {timeout_s:g} s reading {what}") from exc
        except (ModbusException, OSError) as exc:
            self._drop(lost=True)
            raise DeviceError(f"{self.name} unit {unit}: {type(exc).__name__}: {exc}") from exc
        if rr.isError():
            self._answered = True
            self._backoff = 0.0
            code = getattr(rr, "exception_code", None)
            name = EXCEPTION_NAMES.get(code, "unknown")
            raise ExceptionResponseError(f"{self.name} unit {unit}: exception code {code} ({name}) reading {what}",
                                         code if isinstance(code, int) else -1)
        regs = list(rr.registers)
        if len(regs) < count:
            self._drop(lost=False)  # a malformed answer: nothing more of it is read as another's
            raise DeviceError(f"{self.name} unit {unit}: short response ({len(regs)} of {count} registers "
                              f"reading {what})")
        self._answered = True
        self._backoff = 0.0
        return regs[:count]

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class MeterDriver:
    """Reads one meter's profile over a shared bus, learning which requests the meter refuses."""

    def __init__(self, device_id: str, unit_id: int, profile: MeterProfile, bus: ModbusBus, clock: Clock,
                 *, timeout_s: float = 1.0, retries: int = 1, pause_s: float = 0.0,
                 quantities: tuple[str, ...] | None = None):
        self.device_id = device_id
        self.unit_id = unit_id
        self.profile = profile
        self.bus = bus
        self.clock = clock
        self.timeout_s = timeout_s
        self.retries = retries
        self.pause_s = pause_s
        wanted = [q for q in (quantities or ENERGY_QUANTITIES) if q in profile.points]
        self.blocks: list[Block] = plan_blocks(profile, wanted)
        """The requests of one poll: the profile's plan, with what the meter refused split."""
        self.learned: list[Split] = []
        """What this meter refused and how it is read instead, one entry per refused request."""

    async def _read_block(self, block: Block) -> list[int]:
        last: DeviceError | None = None
        for _ in range(self.retries + 1):
            try:
                return await self.bus.read(self.unit_id, block.function, block.start, block.count, self.timeout_s,
                                           self.pause_s)
            except ExceptionResponseError as exc:
                if exc.code in (1, 2, 3):  # the same request gets the same answer
                    raise
                last = exc
            except DeviceError as exc:
                last = exc
        assert last is not None
        raise last

    async def _read_splitting(self, block: Block, learned: list[Split]) -> list[tuple[Block, list[int] | ExceptionResponseError]]:
        """``block`` read as (request, registers) pairs; a coalesced request the meter refuses
        (exception 2 or 3) is split and its parts read instead. A request that cannot be split
        or whose parts are all refused too comes back as (request, the exception)."""
        try:
            return [(block, await self._read_block(block))]
        except ExceptionResponseError as exc:
            parts = split_block(block) if exc.code in REFUSED_SPAN else []
            if not parts:
                return [(block, exc)]
            out: list[tuple[Block, list[int] | ExceptionResponseError]] = []
            for part in parts:
                out += await self._read_splitting(part, learned)
            if all(isinstance(r, ExceptionResponseError) for _, r in out):
                return [(block, exc)]  # the parts alone are refused too: not a matter of the span
            learned.append(Split(block, exc.code, tuple(b for b, _ in out)))
            return out

    async def read(self) -> list[tuple[Block, list[int]]]:
        """Every request of the plan: (request, registers). Learns from refused coalesced
        requests (the plan changes for every later read, logged once per change); DeviceError
        when a request fails (an exception 2 to a point's own request names the point)."""
        out: list[tuple[Block, list[int]]] = []
        learned: list[Split] = []
        done: list[Block] = []
        todo = list(self.blocks)
        try:
            while todo:
                found: list[Split] = []
                results = await self._read_splitting(todo[0], found)
                todo.pop(0)
                done += [b for b, _ in results]
                learned += found
                for b, r in results:
                    if isinstance(r, ExceptionResponseError):
                        raise self._refused(b, r)
                    out.append((b, r))
        finally:
            if learned:  # what was learned holds from now on, even if a later request failed
                self.blocks = done + todo
                self.learned += learned
                log.info("meter %s: %s from now on", self.device_id, "; ".join(map(str, learned)))
        return out

    def _refused(self, block: Block, exc: ExceptionResponseError) -> ExceptionResponseError:
        if len(block.members) != 1 or exc.code != 2:
            return exc
        q, _, p = block.members[0]
        return ExceptionResponseError(f"{exc}: the meter has no register {p.function} {p.address} ({q}, {p.type}); "
                                 f"check the profile's address for {q}", exc.code)

    async def poll(self) -> Reading:
        """One poll: every block read, decoded and stamped at the middle of the exchange."""
        t0 = self.clock.mono()
        values: dict[str, float] = {}
        reasons: dict[str, str] = {}
        try:
            for block, regs in await self.read():
                for q, v in decode_block(self.profile, block, regs).items():
                    why = "not_available" if self._not_available(block, q, regs) else \
                        check_value(q, v, self.profile.max_power_w)
                    if why is None:
                        values[q] = v
                    else:
                        reasons[q] = why
        except DeviceError as exc:
            t = self.clock.mono()
            return Reading(self.device_id, t, self.clock.wall_of_mono(t), error=str(exc))
        t1 = self.clock.mono()
        t = 0.5 * (t0 + t1)
        return Reading(self.device_id, t, self.clock.wall_of_mono(t), values, tuple(reasons), reasons=reasons)

    def _not_available(self, block: Block, q: str, regs: list[int]) -> bool:
        """Whether integer point ``q`` holds its type's 'not available' marker."""
        for name, off, p in block.members:
            if name == q:
                if p.type[0] not in "ui":
                    return False
                wo, bo = self.profile.order(q)
                return codec.not_available(codec.decode(regs[off : off + codec.width(p.type)], p.type, wo, bo), p.type)
        return False
