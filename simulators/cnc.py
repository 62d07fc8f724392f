"""Simulated CNC controllers: one OPC UA server with the node map's variables for each machine.

Each machine gets a folder under Objects (browse name = machine id) holding an object for its
channel and one for its production job (browse names from the node map's ``channel`` and
``job`` params, e.g. ``Channel_1`` and ``Job``), and in them the variables the node map names,
with the node ids it names (string ids in the scenario's namespace). Enumerations are Int32
(OPC 40502 values), ``parts_total`` UInt32, the rest String.

Values follow each machine's timeline (:attr:`simulators.scenario.Timeline.cnc_changes`). An
update task runs every ``tick_s`` (10 ms) real seconds and publishes every change whose
instant has passed, in order, each with its *exact* instant as SourceTimestamp (anchor +
change time; ServerTimestamp = the scenario clock's now). All nodes changing at one instant
share one SourceTimestamp. When the task falls behind, each intermediate change is still
written on its own, so a subscriber with a queue observes every one of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua

from agent.clock import Clock
from simulators.scenario import MachineSim, Scenario

log = logging.getLogger(__name__)

VARIANT = {
    "channel_status": ua.VariantType.Int32, "program_status": ua.VariantType.Int32,
    "operation_mode": ua.VariantType.Int32, "parts_total": ua.VariantType.UInt32,
}
"""Variant type per point; points not listed are strings."""
TICK_S = 0.01


def cnc_events(scenario: Scenario, machine: MachineSim) -> list[tuple[float, dict[str, Any]]]:
    """What one CNC publishes: ``[(-inf, initial values), (t, changed values), ...]`` in time
    order. The one place CNC faults would act: a fault (say, a Bad status) becomes changes at its
    from_s and to_s merged into this list. No CNC fault kind exists yet."""
    return machine.timeline.cnc_changes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


class CncBank:
    """Serves every CNC of a scenario from one OPC UA server."""

    def __init__(self, scenario: Scenario, clock: Clock, *, host: str = "127.0.0.1", port: int = 4840,
                 tick_s: float = TICK_S):
        self.scenario = scenario
        self.clock = clock
        self.host = host
        self.port = port
        self.tick_s = tick_s
        self.server: Server | None = None
        self.nodes: dict[str, dict[str, ua.NodeId]] = {}
        self.events = {m.id: cnc_events(scenario, m) for m in scenario.machines}
        self._next: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self.writes = 0
        self.max_batch = 0
        """Most changes of one machine published in one tick (> 1: the task caught up)."""

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    def sim_time(self) -> float:
        return self.clock.wall() - self.clock.anchor

    async def _build(self, server: Server, idx: dict[str, int], m: MachineSim) -> None:
        ns = idx[self.scenario.namespace]
        nm = m.cnc.node_map_model
        ids = nm.resolve({"namespace": self.scenario.namespace, "channel": m.cnc.channel, "job": m.cnc.job})
        folder = await server.nodes.objects.add_folder(ua.NodeId(m.id, ns), ua.QualifiedName(m.id, ns))
        parents: dict[str, Any] = {}
        initial = self.events[m.id][0][1]
        self.nodes[m.id] = {}
        for point, text in ids.items():
            if point not in initial:
                log.warning("%s: node map point %r is not simulated; node %s not created", m.id, point, text)
                continue
            if text.startswith("nsu="):
                uri, rest = text[4:].split(";", 1)
                if uri not in idx:
                    idx[uri] = await server.register_namespace(uri)
                text = f"ns={idx[uri]};{rest}"
            nodeid = ua.NodeId.from_string(text)
            parent, browse = folder, point
            if nodeid.NodeIdType == ua.NodeIdType.String:
                browse = nodeid.Identifier
                for prefix in (m.cnc.channel, m.cnc.job):
                    if nodeid.Identifier.startswith(prefix + "."):
                        if prefix not in parents:
                            parents[prefix] = await folder.add_object(
                                ua.NodeId(prefix, nodeid.NamespaceIndex),
                                ua.QualifiedName(prefix.rsplit(".", 1)[-1], nodeid.NamespaceIndex))
                        parent, browse = parents[prefix], nodeid.Identifier[len(prefix) + 1:]
                        break
            vt = VARIANT.get(point, ua.VariantType.String)
            node = await parent.add_variable(nodeid, ua.QualifiedName(browse, nodeid.NamespaceIndex),
                                             ua.Variant(initial[point], vt))
            self.nodes[m.id][point] = node.nodeid

    async def start(self) -> None:
        """Build the address space, show the values of now, start serving and updating."""
        if self.port == 0:
            self.port = free_port(self.host)  # the endpoint URL the server announces must be the real one
        server = Server()
        await server.init()  # ~2 s; scenario time is read after it
        server.set_endpoint(self.endpoint)
        server.set_server_name("energy-agent CNC simulator")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        idx = {self.scenario.namespace: await server.register_namespace(self.scenario.namespace)}
        for m in self.scenario.machines:
            await self._build(server, idx, m)
        self.server = server
        now = self.sim_time()
        for m in self.scenario.machines:
            await self._show_initial(m.id, now)
        await server.start()
        self._task = asyncio.create_task(self._run(), name="cnc-updates")

    async def _show_initial(self, machine: str, now: float) -> None:
        """Values at ``now``, each stamped with the instant it last changed (now if never)."""
        values: dict[str, tuple[Any, float]] = {}
        i = 0
        events = self.events[machine]
        while i < len(events) and events[i][0] <= now:
            t, changed = events[i]
            for q, v in changed.items():
                values[q] = (v, t if math.isfinite(t) else now)
            i += 1
        self._next[machine] = i
        for q, (v, t) in values.items():
            await self._write(machine, q, v, _utc(self.clock.anchor + t))

    async def _write(self, machine: str, point: str, value: Any, stamp: datetime) -> None:
        nodeid = self.nodes[machine].get(point)
        if nodeid is None:
            return
        assert self.server is not None
        dv = ua.DataValue(ua.Variant(value, VARIANT.get(point, ua.VariantType.String)),
                          SourceTimestamp=stamp, ServerTimestamp=_utc(self.clock.wall()))
        await self.server.write_attribute_value(nodeid, dv)
        self.writes += 1

    async def publish_due(self, now: float) -> int:
        """Publish, in order, every change at or before scenario time ``now`` not yet published."""
        n = 0
        for machine, events in self.events.items():
            i, batch = self._next[machine], 0
            while i < len(events) and events[i][0] <= now:
                t, changed = events[i]
                stamp = _utc(self.clock.anchor + t)
                for q, v in changed.items():
                    await self._write(machine, q, v, stamp)
                i += 1
                batch += 1
            self._next[machine] = i
            self.max_batch = max(self.max_batch, batch)
            n += batch
        return n

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_due(self.sim_time())
            except Exception:  # keep serving; a failed write is logged, not fatal
                log.exception("CNC simulator: publishing failed")
            await asyncio.sleep(self.tick_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def __aenter__(self) -> "CncBank":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
