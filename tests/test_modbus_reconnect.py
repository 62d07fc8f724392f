"""ModbusBus recovers from meters whose listener closes and reopens, however often and however
briefly: listener_dropped_and_restored_hundreds_of_times.

Four hand-written Modbus TCP servers (tests/rawmodbus.py), ten meters behind each (one
ModbusBus per port, as the agent has one per connection), every meter polled every POLL_S.
Each server, independently, 55 times: drops its listener with every open connection, stays down
for a random time (half of the drops shorter than a poll interval), in some cycles comes back
first as a listener that accepts connections and hangs up at once (a device whose TCP stack is
up before its Modbus service: the peer that left a pymodbus client "connected" to a closed
transport for good), then serves normally again. After each return every poller on that port
must read again within

    RECOVERY_BOUND_S = backoff_max + timeout + 2 poll intervals

(a request sent into a connection that died meanwhile times out once; a connect refused just
before the return waits at most backoff_max; one poll interval to notice a connection closed
under it, one for the next scheduled poll). Every reading is checked against the registers its
own unit serves, so nothing of a dropped exchange is read as another meter's answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct

import numpy as np

from energy_agent.core.clock import Clock
from energy_agent.drivers.modbus import MeterDriver, ModbusBus
from energy_agent.drivers.profile import MeterProfile
from tests.rawmodbus import RawModbusServer

PORTS = 4
METERS_PER_PORT = 10
CYCLES_PER_PORT = 55                # 220 drops in all
POLL_S = 0.1
TIMEOUT_S = 0.25
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.02, 0.4
RECOVERY_BOUND_S = BACKOFF_MAX_S + TIMEOUT_S + 2 * POLL_S
GIVE_UP_S = 5.0                     # a poller not back by then is stuck (the bug this guards against)
SEED = 20

PROFILE = MeterProfile(name="reconnect-test", vendor="test", model="two floats", document="this test",
                       points={"power_w": {"address": 0, "function": "input", "type": "f32"},
                               "energy_import_kwh": {"address": 2, "function": "input", "type": "f32"}})


def power_w(unit: int) -> float:
    return 100.0 * unit


def energy_kwh(unit: int) -> float:
    return 1000.0 + unit


def registers(unit: int, fc: int, address: int, count: int) -> list[int] | int:
    if fc != 4 or address != 0 or count != 4:
        return 2
    return list(struct.unpack(">4H", struct.pack(">ff", power_w(unit), energy_kwh(unit))))


class Poller:
    """One meter polled on its own schedule, as the agent's poll task does."""

    def __init__(self, driver: MeterDriver, phase: float):
        self.driver, self.phase = driver, phase
        self.ok_at: list[float] = []
        self.last_error = ""
        self.wrong: list[str] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        unit = self.driver.unit_id
        next_at = loop.time() + self.phase * POLL_S
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            r = await self.driver.poll()
            now = loop.time()
            if r.ok:
                self.ok_at.append(now)
                if r.values != {"power_w": power_w(unit), "energy_import_kwh": energy_kwh(unit)}:
                    self.wrong.append(f"unit {unit} read {r.values}")
            else:
                self.last_error = r.error or ""
            next_at += POLL_S
            if next_at < now:
                next_at = now + POLL_S - (now - next_at) % POLL_S

    def back_after(self, t: float) -> float | None:
        """Seconds from t to the first good reading after it, or None."""
        later = [x for x in self.ok_at if x > t]
        return later[0] - t if later else None


async def chaos(server: RawModbusServer, pollers: list[Poller], rng: random.Random, recoveries: list[float]) -> None:
    """Drop and restore one listener CYCLES_PER_PORT times; after each return wait (with a
    deadline) until every poller on it has read again, recording how long each took."""
    loop = asyncio.get_running_loop()
    up_at = loop.time()
    for cycle in range(CYCLES_PER_PORT):
        deadline = up_at + GIVE_UP_S
        while not all(p.back_after(up_at) is not None for p in pollers):
            if loop.time() > deadline:
                stuck = [(p.driver.device_id, p.last_error) for p in pollers if p.back_after(up_at) is None]
                raise AssertionError(f"port {server.port} cycle {cycle}: pollers not back after {GIVE_UP_S} s: {stuck}")
            await asyncio.sleep(0.01)
        recoveries += [p.back_after(up_at) for p in pollers]
        await asyncio.sleep(rng.uniform(0.0, 0.15))       # up a while (sometimes dropped right away)
        await server.stop()
        short = rng.random() < 0.5
        await asyncio.sleep(rng.uniform(0.002, POLL_S) if short else rng.uniform(POLL_S, 0.6))
        if rng.random() < 0.5:                             # back first as a listener that resets
            await server.start(reset=True)
            await asyncio.sleep(rng.uniform(0.005, 0.2))
            await server.stop()
        await server.start()
        up_at = loop.time()


async def test_listener_dropped_and_restored_hundreds_of_times(caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    rng = random.Random(SEED)
    servers = [RawModbusServer(registers) for _ in range(PORTS)]
    for s in servers:
        await s.start()
    buses = [ModbusBus("127.0.0.1", s.port, timeout_s=TIMEOUT_S, backoff_min_s=BACKOFF_MIN_S,
                       backoff_max_s=BACKOFF_MAX_S) for s in servers]
    pollers = [[Poller(MeterDriver(f"pm-{k}-{u}", u, PROFILE, bus, Clock(), timeout_s=TIMEOUT_S, retries=0),
                       phase=(u - 1) / METERS_PER_PORT) for u in range(1, METERS_PER_PORT + 1)]
               for k, bus in enumerate(buses)]
    tasks = [asyncio.create_task(p.run()) for ps in pollers for p in ps]
    recoveries: list[float] = []
    try:
        await asyncio.gather(*(chaos(s, ps, random.Random(rng.random()), recoveries)
                               for s, ps in zip(servers, pollers)))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses:
            await bus.close()
        for s in servers:
            await s.stop()
    r = np.array(recoveries)
    print(f"\n{PORTS * CYCLES_PER_PORT} drops, {r.size} recoveries: median {np.median(r):.3f} s, "
          f"p99 {np.percentile(r, 99):.3f} s, worst {r.max():.3f} s (bound {RECOVERY_BOUND_S:.2f} s); "
          f"connections {sum(s.accepted for s in servers)} served, {sum(s.reset for s in servers)} reset")
    assert r.size == PORTS * CYCLES_PER_PORT * METERS_PER_PORT
    assert r.max() <= RECOVERY_BOUND_S, f"worst recovery {r.max():.3f} s > bound {RECOVERY_BOUND_S:.2f} s"
    assert not [w for ps in pollers for p in ps for w in p.wrong]
    # The symptom of a client writing into a closed transport for good: asyncio warns from the
    # fifth write on. A connection is dropped at its first timeout, so never more than one.
    assert not [rec for rec in caplog.records if "socket.send() raised exception" in rec.getMessage()]
