"""A Modbus TCP server written from the protocol spec with asyncio streams, for tests.

It shares no code with pymodbus or with our simulators: registers come from a callback
``registers(unit, function_code, address, count) -> list[int] | int`` (an int is a Modbus
exception code), so a test can serve hand-packed bytes and check that our client decodes
what the spec says, not what our own encoder agreed with.

It can also misbehave at the TCP level the way restarting devices do: :meth:`stop` closes the
listener *and* every open connection, :meth:`start` listens again on the same port, and
``start(reset=True)`` listens with a thread that accepts every connection and resets it at once
(SO_LINGER 0: an RST), the way a device resets the connections in its backlog when its listener
closes, or answers while its TCP stack is up and its Modbus service not yet. The thread resets
within microseconds of the handshake, while the client is still inside its connect call.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable

Registers = Callable[[int, int, int, int], "list[int] | int"]


class RawModbusServer:
    def __init__(self, registers: Registers, *, port: int = 0):
        self.registers = registers
        self.server: asyncio.base_events.Server | None = None
        self.port = port
        self.requests = 0
        self.accepted = 0
        self.reset = 0
        """Connections reset by the resetting listener."""
        self._writers: set[asyncio.StreamWriter] = set()
        self._resetter: tuple[threading.Thread, socket.socket, threading.Event] | None = None

    async def start(self, *, reset: bool = False) -> int:
        """Listen (on the port of the first start, when started again); the port. With
        ``reset``, every connection is accepted and reset at once."""
        if reset:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            sock.settimeout(0.005)
            self.port = sock.getsockname()[1]
            stop = threading.Event()
            thread = threading.Thread(target=self._reset_all, args=(sock, stop), daemon=True)
            thread.start()
            self._resetter = (thread, sock, stop)
            return self.port
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._resetter is not None:
            thread, sock, stop = self._resetter
            self._resetter = None
            stop.set()
            await asyncio.to_thread(thread.join)
            sock.close()
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.close()
        if server is not None:
            await server.wait_closed()

    def _reset_all(self, sock: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            self.reset += 1

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.server is None:
            writer.close()
            return
        self._writers.add(writer)
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
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
