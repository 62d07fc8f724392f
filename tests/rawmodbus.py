"""A Modbus TCP server written from the protocol spec with asyncio streams, for tests.

It shares no code with pymodbus or with our simulators: registers come from a callback
``registers(unit, function_code, address, count) -> list[int] | int`` (an int is a Modbus
exception code), so a test can serve hand-packed bytes and check that our client decodes
what the spec says, not what our own encoder agreed with.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

Registers = Callable[[int, int, int, int], "list[int] | int"]


class RawModbusServer:
    def __init__(self, registers: Registers):
        self.registers = registers
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.requests = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                tid, proto, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                self.requests += 1
                fc = pdu[0]
                if proto != 0 or fc not in (3, 4) or len(pdu) != 5:
                    body = bytes([fc | 0x80, 1])  # illegal function
                else:
                    address, count = struct.unpack(">HH", pdu[1:5])
                    regs = self.registers(unit, fc, address, count)
                    if isinstance(regs, int):
                        body = bytes([fc | 0x80, regs])
                    else:
                        body = bytes([fc, 2 * count]) + struct.pack(f">{count}H", *regs)
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        finally:
            writer.close()
