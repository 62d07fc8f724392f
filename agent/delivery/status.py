"""Retained status topics: is the agent online, and is each of its devices answering.

``<prefix>/<site>/<agent>/status`` holds ``{"state": "online"|"offline", "since": ISO time}``,
retained. The same topic with ``offline`` is the connection's last will, so the broker
announces a crashed or cut-off agent by itself; a clean stop publishes ``offline`` first.

``<prefix>/<site>/<agent>/device/<device>/availability`` holds, retained,
``{"state": "online"|"offline", "since": ..., "error": ...}`` per meter and CNC, published
when it changes. Everything is published again on every new connection, so a broker that lost
its retained messages gets them back.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from energy_agent.core.clock import wait_any
from energy_agent.core.errors import DeliveryError
from energy_agent.core.record import canonical_json
from energy_agent.delivery.mqtt import MqttClient

log = logging.getLogger(__name__)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{site}/{agent}/status"


def offline_payload() -> bytes:
    return canonical_json({"state": "offline"})


class Status:
    def __init__(self, client: MqttClient, *, prefix: str, site: str, agent: str, wall):
        self.client = client
        self.base = f"{prefix}/{site}/{agent}"
        self.topic = status_topic(prefix, site, agent)
        self.wall = wall
        self.started = wall()
        self.devices: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._connections = 0
        self._wake = asyncio.Event()

    def device(self, device_id: str, ok: bool, error: str | None = None) -> None:
        """A device's availability as the agent sees it now; published when it changes."""
        state = "online" if ok else "offline"
        cur = self.devices.get(device_id)
        if cur is not None and cur["state"] == state:
            return
        self.devices[device_id] = {"state": state, "since": _iso(self.wall()), **({"error": error} if error else {})}
        self._dirty.add(device_id)
        self._wake.set()

    def device_topic(self, device_id: str) -> str:
        return f"{self.base}/device/{device_id}/availability"

    async def _publish(self, topic: str, body: dict) -> None:
        await self.client.publish(topic, canonical_json(body), qos=1, retain=True, timeout=10.0)

    async def _flush(self) -> None:
        connections = self.client.connections
        if connections != self._connections:  # a new connection: everything again
            await self._publish(self.topic, {"state": "online", "since": _iso(self.started)})
            self._connections = connections
            self._dirty |= set(self.devices)
        while self._dirty:
            device = self._dirty.pop()
            try:
                await self._publish(self.device_topic(device), self.devices[device])
            except DeliveryError:
                self._dirty.add(device)
                raise

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            if self.client.connected:
                try:
                    await self._flush()
                except DeliveryError as exc:
                    log.debug("status not published yet: %s", exc)
            await wait_any(self._wake, stop, 1.0)

    async def offline(self) -> None:
        """On a clean stop: say so (the will is only sent for an unclean disconnect)."""
        if not self.client.connected:
            return
        try:
            await self.client.publish(self.topic, canonical_json({"state": "offline", "since": _iso(self.wall())}),
                                      qos=1, retain=True, timeout=3.0)
        except DeliveryError as exc:
            log.warning("could not publish the offline status: %s", exc)
