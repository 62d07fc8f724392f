"""Simulated CNC controllers: one OPC UA server, the node map's variables per machine.

Values follow each machine's timeline (OPC 40502 style enumerations, program, job id, parts
counter, product, serial, subassembly). An update task publishes every change with the
*exact* instant it happened as SourceTimestamp (scenario anchor + change time), and when the
task falls behind it publishes each intermediate change in order, so a subscriber with a queue
observes every one of them.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from asyncua import Server, ua

from agent.clock import Clock
from drivers.profile import load_nodemap
from simulators.scenario import Scenario

log = logging.getLogger(__name__)

VARIANT = {
    "channel_status": ua.VariantType.Int32, "program_status": ua.VariantType.Int32,
    "operation_mode": ua.VariantType.Int32, "parts_total": ua.VariantType.UInt32,
}
TICK_S = 0.01


class CncBank:
    def __init__(self, scenario: Scenario, clock: Clock, *, host: str = "127.0.0.1", port: int = 4840):
        self.scenario = scenario
        self.clock = clock
        self.endpoint = f"opc.tcp://{host}:{port}"
        self.server = Server()
        self.nodes: dict[str, dict[str, object]] = {}
        self.shown: dict[str, dict[str, object]] = {}
        self._task: asyncio.Task | None = None
        self._last_t = 0.0

    def sim_time(self) -> float:
        return self.clock.wall() - self.clock.anchor

    async def start(self) -> None:
        await self.server.init()  # ~2 s: scenario time is read after it
        self.server.set_endpoint(self.endpoint)
        self.server.set_server_name("energy-agent CNC simulator")
        idx = await self.server.register_namespace(self.scenario.namespace)
        t = self.sim_time()
        for m in self.scenario.machines:
            nm = load_nodemap(m.cnc.node_map)
            ids = nm.resolve({"namespace": self.scenario.namespace, "channel": m.cnc.channel, "job": m.cnc.job})
            folder = await self.server.nodes.objects.add_object(ua.NodeId(m.id, idx), ua.QualifiedName(m.id, idx))
            values = self.scenario.timelines[m.id].cnc_values(t)
            nodes = {}
            for point, nid in ids.items():
                if point not in values:
                    continue
                string_id = nid.split(";s=", 1)[1]
                vt = VARIANT.get(point, ua.VariantType.String)
                nodes[point] = await folder.add_variable(ua.NodeId(string_id, idx), ua.QualifiedName(point, idx),
                                                         ua.Variant(values[point], vt))
            self.nodes[m.id] = nodes
            self.shown[m.id] = {}
            await self._publish(m.id, t, self.scenario.timelines[m.id].last_change(t))
        await self.server.start()
        self._last_t = t
        self._task = asyncio.create_task(self._run(), name="cnc-updates")

    async def _publish(self, machine: str, t: float, changed_at: float | None = None) -> None:
        """Show the values at t, stamped with the instant they changed (t itself by default)."""
        values = self.scenario.timelines[machine].cnc_values(t)
        when = t if changed_at is None else changed_at
        stamp = datetime.fromtimestamp(self.clock.anchor + when, timezone.utc)
        for point, node in self.nodes[machine].items():
            v = values[point]
            if self.shown[machine].get(point) != v:
                vt = VARIANT.get(point, ua.VariantType.String)
                await node.write_value(ua.DataValue(ua.Variant(v, vt), SourceTimestamp=stamp, ServerTimestamp=stamp))
        self.shown[machine] = values

    async def _run(self) -> None:
        while True:
            now = self.sim_time()
            for m in self.scenario.machines:
                for change in self.scenario.timelines[m.id].change_times(self._last_t, now):
                    await self._publish(m.id, change)
            self._last_t = now
            await asyncio.sleep(TICK_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.stop()
