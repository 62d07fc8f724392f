"""A TCP proxy in front of the simulated meters that damages responses on the wire.

pymodbus' server only sends well-formed frames, but a real line delivers damaged ones too: an
RS-485 segment behind a gateway with noise gives frames with a wrong CRC, a gateway that gives
up mid-frame cuts them, a meter with a firmware fault answers with fewer registers than asked.
The proxy sits between the client and the meter server (``MeterBank`` puts it in front when the
scenario has a ``modbus_garbled`` fault). Requests pass unchanged. Responses are parsed frame by
frame (the MBAP header for TCP framing; unit, function code and byte count for RTU-over-TCP),
and a response of a unit whose ``modbus_garbled`` fault holds at the moment it passes (scenario
time) is damaged:

- ``corrupt`` (default): RTU-over-TCP: the CRC's last byte is inverted. TCP: the frame is sent
  without its last byte while its MBAP length still counts it (a cut frame; the client waits for
  a byte that never comes).
- ``short``: a well-formed register response carrying half the registers asked for (byte count,
  MBAP length and CRC consistent with what is sent); exception responses pass unchanged.

Responses of other units pass unchanged, so a client can check that one damaged meter does not
disturb the others on the same connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from energy_agent.simulators.scenario import Fault, Scenario

log = logging.getLogger(__name__)

READ_FCS = (1, 2, 3, 4)
WRITE_FCS = (5, 6, 15, 16)


def crc16(frame: bytes) -> bytes:
    """Modbus RTU CRC of ``frame`` as sent on the line (low byte first)."""
    crc = 0xFFFF
    for b in frame:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def rtu_frame_size(buf: bytes) -> int | None:
    """Size of the RTU response at the start of ``buf``; None until enough bytes are there,
    0 when the function code is not one the meters answer (pass the rest through)."""
    if len(buf) < 3:
        return None
    fc = buf[1]
    if fc & 0x80:
        size = 5
    elif fc in READ_FCS:
        size = 3 + buf[2] + 2
    elif fc in WRITE_FCS:
        size = 8
    else:
        return 0
    return size if len(buf) >= size else None


def tcp_frame_size(buf: bytes) -> int | None:
    """Size of the MBAP frame at the start of ``buf``; None until it is complete."""
    if len(buf) < 7:
        return None
    size = 6 + int.from_bytes(buf[4:6], "big")
    return size if len(buf) >= size else None


def damage(frame: bytes, framer: str, mode: str) -> bytes:
    """The damaged form of one complete response frame (see the module docstring)."""
    if framer == "tcp":
        header, unit, pdu = frame[:6], frame[6:7], frame[7:]
        if mode == "short":
            pdu = _short(pdu)
            return header[:4] + (1 + len(pdu)).to_bytes(2, "big") + unit + pdu
        return frame[:-1]  # the MBAP length still counts the byte not sent
    unit, pdu = frame[:1], frame[1:-2]
    if mode == "short":
        body = unit + _short(pdu)
        return body + crc16(body)
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


def _short(pdu: bytes) -> bytes:
    """A register or bit read response with half its data bytes (whole registers), else as is."""
    if len(pdu) < 2 or pdu[0] & 0x80 or pdu[0] not in READ_FCS:
        return pdu
    keep = (pdu[1] // 4) * 2 if pdu[0] in (3, 4) else pdu[1] // 2
    return pdu[:1] + bytes([keep]) + pdu[2 : 2 + keep]


class GarblingProxy:
    """Listens on ``port`` (0: a free one) and forwards each connection to the meter server."""

    def __init__(self, scenario: Scenario, clock: Any, framer: str, *, host: str = "127.0.0.1", port: int = 0):
        if framer not in ("tcp", "rtu-over-tcp"):
            raise ValueError(f"framer {framer!r}: the proxy damages tcp or rtu-over-tcp frames")
        self.clock = clock
        self.framer = framer
        self.host, self._port = host, port
        self.faults: dict[int, list[Fault]] = {}
        for m in scenario.machines:
            self.faults[m.meter.unit_id] = [f for f in scenario.faults_of(m.id, "meter") if f.kind == "modbus_garbled"]
        self.damaged = 0
        """Responses damaged so far."""
        self._server: asyncio.AbstractServer | None = None
        self._upstream: tuple[str, int] = ("", 0)
        self._pumps: set[asyncio.Task] = set()
        self._conns: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    def sim_time(self) -> float:
        return self.clock.wall() - self.clock.anchor

    def mode_for(self, unit: int) -> str | None:
        """The damage to do to a response of ``unit`` now, or None."""
        t = self.sim_time()
        for f in self.faults.get(unit, ()):
            if f.active(t):
                return f.mode or "corrupt"
        return None

    async def start(self, upstream_host: str, upstream_port: int) -> None:
        """Listen (again, after :meth:`stop`: on the port bound the first time)."""
        self._upstream = (upstream_host, upstream_port)
        self._server = await asyncio.start_server(self._connection, self.host, self._port)
        self._port = self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, *self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection, until either side closes it or the proxy stops. Returns
        normally in every case: asyncio's stream server treats a cancelled handler as an error."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError as exc:
            log.warning("garbling proxy: meter server %s:%d not reachable: %s", *self._upstream, exc)
            writer.close()
            return
        self._writers |= {writer, up_writer}
        me = asyncio.current_task()
        self._conns.add(me)
        pumps = [asyncio.create_task(self._requests(reader, up_writer)),
                 asyncio.create_task(self._responses(up_reader, writer))]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            self._conns.discard(me)
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)

    @staticmethod
    async def _requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # either side went away: the connection ends

    async def _responses(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size_of = tcp_frame_size if self.framer == "tcp" else rtu_frame_size
        unit_at = 6 if self.framer == "tcp" else 0
        buf = b""
        try:
            await self._pump_responses(reader, writer, size_of, unit_at, buf)
        except ConnectionError:
            pass

    async def _pump_responses(self, reader, writer, size_of, unit_at, buf: bytes) -> None:
        while data := await reader.read(4096):
            buf += data
            out = b""
            while (size := size_of(buf)) is not None:
                if size == 0:  # not a response the meters give: pass everything through
                    out, buf = out + buf, b""
                    break
                frame, buf = buf[:size], buf[size:]
                mode = self.mode_for(frame[unit_at])
                if mode is not None:
                    frame = damage(frame, self.framer, mode)
                    self.damaged += 1
                out += frame
            if out:
                writer.write(out)
                await writer.drain()
