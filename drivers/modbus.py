"""Modbus meters: one bus object per physical connection, one driver per meter.

A :class:`ModbusBus` owns the pymodbus client of one TCP socket, RTU-over-TCP gateway or
local serial line. Meters behind it share it; an ``asyncio.Lock`` serialises their requests
(an RS-485 line answers one request at a time) and a meter may ask for a quiet pause after
each of its requests. The bus connects on demand and backs off
exponentially (capped) after a failure, so a dead gateway costs one connect attempt per
backoff step, not one per poll.

A :class:`MeterDriver` reads the registers its profile names in as few requests as the
profile allows (coalesced blocks), decodes them and returns a :class:`Reading`. Values that
cannot be measurements are reported in ``Reading.bad`` (with the reason in
``Reading.reasons``), never passed on as numbers: NaN or infinity, an integer register's 'not
available' marker, power above the profile's ``max_power_w`` or clearly negative. Damaged
frames (a wrong CRC, a cut frame: pymodbus drops them, the request times out; a response with
fewer registers than asked) and exception responses make the whole poll an error; after a
timeout on RTU framing or a malformed answer the next request goes out on a fresh connection,
so that nothing left of the bad exchange is read as the answer to another meter's request.
pymodbus exceptions stay in this module: callers see :class:`DeviceError` or a Reading with
``error`` set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from energy_agent.core.clock import Clock
from energy_agent.core.errors import DeviceError
from energy_agent.core.reading import Reading
from energy_agent.drivers import codec
from energy_agent.drivers.profile import Block, MeterProfile, decode_block, plan_blocks

log = logging.getLogger(__name__)

ENERGY_QUANTITIES = ("power_w", "energy_import_kwh")
"""What the agent reads on every poll; the rest of a profile is read by ``probe``."""

NEGATIVE_POWER_SHARE = 1e-3
NEGATIVE_POWER_MIN_W = 10.0
"""Power below -max(10 W, 0.1 % of max_power_w) is a reversed CT or a sign error, not a
consumer's: not used. A meter's noise around zero (an idle machine reading -0.4 W) stays above."""


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
    """One Modbus connection shared by the devices behind it."""

    def __init__(self, host: str, port: int, *, framer: str = "tcp", timeout_s: float = 1.0,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, serial=None):
        self._rtu = serial is not None or framer != "tcp"
        if serial is not None:
            self.name = f"rtu://{serial.device}@{serial.baudrate}{serial.parity}{serial.stopbits}"
            self._make = lambda: AsyncModbusSerialClient(
                serial.device, framer=FramerType.RTU, baudrate=serial.baudrate, parity=serial.parity,
                stopbits=serial.stopbits, bytesize=serial.bytesize, timeout=timeout_s, retries=0,
                reconnect_delay=0, reconnect_delay_max=0)
        else:
            self.name = f"{framer}://{host}:{port}"
            self._make = lambda: AsyncModbusTcpClient(
                host, port=port, framer=FramerType.SOCKET if framer == "tcp" else FramerType.RTU,
                timeout=timeout_s, retries=0, reconnect_delay=0, reconnect_delay_max=0)
        self._timeout = timeout_s
        self._client = None
        self._lock = asyncio.Lock()
        self._backoff_min, self._backoff_max = backoff_min_s, backoff_max_s
        self._backoff = 0.0
        self._next_attempt = 0.0

    @classmethod
    def for_meter(cls, dev) -> "ModbusBus":
        """The bus of a configured meter (``energy_agent.app.config.MeterDevice``)."""
        return cls(dev.host or "", dev.port, framer=dev.transport, timeout_s=dev.timeout_s,
                   serial=dev.serial if dev.transport == "rtu" else None)

    async def _ensure(self):
        if self._client is not None and self._client.connected:
            return self._client
        now = time.monotonic()
        if now < self._next_attempt:
            raise DeviceError(f"{self.name}: not connected (next attempt in {self._next_attempt - now:.1f} s)")
        if self._client is None:
            self._client = self._make()
        try:
            ok = await asyncio.wait_for(self._client.connect(), self._timeout + 1.0)
        except (OSError, ModbusException, asyncio.TimeoutError) as exc:
            ok = False
            cause = f"{type(exc).__name__}: {exc}"
        else:
            cause = "connection refused or timed out"
        if not ok:
            self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
            self._next_attempt = time.monotonic() + self._backoff
            self._client.close()
            raise DeviceError(f"{self.name}: cannot connect ({cause})")
        self._backoff = 0.0
        return self._client

    async def read(self, unit: int, function: str, address: int, count: int, timeout_s: float,
                   pause_s: float = 0.0) -> list[int]:
        """Read ``count`` registers; DeviceError names the cause (timeout, exception code, ...)."""
        async with self._lock:
            try:
                return await self._read(unit, function, address, count, timeout_s)
            finally:
                if pause_s:
                    await asyncio.sleep(pause_s)  # bus quiet time, still holding the line

    async def _read(self, unit: int, function: str, address: int, count: int, timeout_s: float) -> list[int]:
        client = await self._ensure()
        call = client.read_input_registers if function == "input" else client.read_holding_registers
        try:
            async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
                rr = await call(address, count=count, device_id=unit)
        except TimeoutError:
            # No answer, or one pymodbus dropped as damaged (wrong CRC, cut frame). RTU frames
            # carry no transaction id: a late answer would be read as the answer to the next
            # request, so that one goes out on a fresh connection. Over TCP the transaction id
            # rejects a late answer and pymodbus drops what is left of a cut frame when it sends
            # the next request: the connection (maybe a gateway's only one) is kept.
            if self._rtu:
                client.close()
            raise DeviceError(f"{self.name} unit {unit}: no answer within {timeout_s:g} s") from None
        except (ModbusException, OSError) as exc:
            client.close()
            raise DeviceError(f"{self.name} unit {unit}: {type(exc).__name__}: {exc}") from exc
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            raise DeviceError(f"{self.name} unit {unit}: exception code {code} reading {function} {address}+{count}")
        regs = list(rr.registers)
        if len(regs) < count:
            client.close()  # a malformed answer: nothing more of it is read as another's
            raise DeviceError(f"{self.name} unit {unit}: short response ({len(regs)} of {count} registers "
                              f"reading {function} {address}+{count})")
        return regs[:count]

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class MeterDriver:
    """Reads one meter's profile over a shared bus."""

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

    async def _read_block(self, block: Block) -> list[int]:
        last: DeviceError | None = None
        for _ in range(self.retries + 1):
            try:
                return await self.bus.read(self.unit_id, block.function, block.start, block.count, self.timeout_s,
                                           self.pause_s)
            except DeviceError as exc:
                last = exc
        assert last is not None
        raise last

    async def poll(self) -> Reading:
        """One poll: every block read, decoded and stamped at the middle of the exchange."""
        t0 = self.clock.mono()
        values: dict[str, float] = {}
        reasons: dict[str, str] = {}
        try:
            for block in self.blocks:
                regs = await self._read_block(block)
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
