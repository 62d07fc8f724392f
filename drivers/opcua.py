"""OPC UA CNC controllers: the nodes a node map names, as a stream of snapshots.

:class:`CncDriver` connects to one server, resolves the node ids of its node map (``ns=…``
or the restart-stable ``nsu=<namespace URI>;…`` form), reads every value once and then
follows changes through a subscription (data-change notifications with a queue, so no
intermediate change is lost between two publishes) or, where a server cannot subscribe, by
polling. Every change becomes a :class:`Reading` holding the full snapshot of all points,
stamped with the server's SourceTimestamp of the change, clamped between the previous
reading and the moment it arrived; changes of one instant are merged into one snapshot (a CNC clock that is off cannot move a job boundary
outside the window in which it was observed). On a lost connection it reconnects with capped
backoff and logs once per outage. asyncua types and exceptions stay in this module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent

from agent.clock import Clock, sleep_or_stop
from agent.errors import DeviceError
from drivers.profile import NodeMap
from drivers.reading import Reading

log = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.005
"""Notifications arriving within this many real seconds are applied as one batch."""


def _plain(value: Any) -> Any:
    """Scalars as Python values: enums to int, LocalizedText to str."""
    if isinstance(value, ua.LocalizedText):
        return value.Text or ""
    if hasattr(value, "value") and isinstance(getattr(value, "value"), int):
        return int(value.value)
    return value


async def resolve_node_id(client: Client, text: str) -> ua.NodeId:
    """Parse 'ns=…;…' or 'nsu=URI;…' (the URI looked up on this server) into a NodeId."""
    if text.startswith("nsu="):
        uri, _, rest = text[4:].partition(";")
        if not rest:
            raise DeviceError(f"node id {text!r}: nothing after the namespace URI")
        try:
            idx = await client.get_namespace_index(uri)
        except ValueError:
            raise DeviceError(f"namespace {uri!r} is not on the server") from None
        text = f"ns={idx};{rest}"
    try:
        return ua.NodeId.from_string(text)
    except Exception as exc:  # asyncua raises its own parsing errors
        raise DeviceError(f"node id {text!r}: {exc}") from None


class CncDriver:
    """Follows one CNC's node map and hands snapshots to ``emit``."""

    def __init__(self, device_id: str, endpoint: str, nodemap: NodeMap, node_ids: dict[str, str], clock: Clock,
                 emit: Callable[[Reading], None], *, mode: str = "subscribe", interval_s: float = 0.5,
                 timeout_s: float = 4.0, timestamps: str = "source",
                 backoff_min_s: float = 1.0, backoff_max_s: float = 60.0):
        self.device_id = device_id
        self.endpoint = endpoint
        self.nodemap = nodemap
        self.node_ids = node_ids
        self.clock = clock
        self.emit = emit
        self.mode = mode
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.use_source = timestamps == "source"
        self.backoff = (backoff_min_s, backoff_max_s)
        self.values: dict[str, Any] = {}
        self.last_t = float("-inf")
        self.available = False
        self._pending: dict[str, tuple[Any, bool]] = {}
        self._pending_t: float | None = None
        self._pending_key: float | str | None = None
        self._pending_wall = 0.0
        self.last_wall = 0.0
        self._batch = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self.quiet_s = 1.5 * self.clock.real_seconds(interval_s) + 0.05
        """Real seconds without news after which an instant is complete (> one publishing interval)."""

    # ----------------------------------------------------------------------- stamping

    def _apply(self, changes: list[tuple[str, Any, datetime | None, bool]]) -> None:
        """Merge (point, value, source time, good) changes into per-instant snapshots.

        Changes stamped with the same instant may arrive in separate notifications (a server
        updates nodes one by one). They are merged, and the snapshot of an instant is emitted
        only when a later instant arrives or nothing has arrived for a quiet period, so the
        tracker never sees a half-applied instant (state active, job id not yet set).
        Instants are identified by their SourceTimestamp (with ``timestamps: received``, by the
        notification batch) and placed on the monotonic axis no later than their arrival and
        no earlier than the previous instant.
        """
        mono, wall = self.clock.now()
        self._batch += 1
        items = []
        for q, v, src, good in changes:
            if self.use_source and src is not None:
                if src.tzinfo is None:
                    src = src.replace(tzinfo=timezone.utc)
                key: float | str = src.timestamp()
                t, w = (mono - (wall - key), key) if key < wall else (mono, wall)
            else:
                key, t, w = f"batch {self._batch}", mono, wall
            items.append((t, w, key, q, v, good))
        items.sort(key=lambda c: c[0])
        for t, w, key, q, v, good in items:
            pk = self._pending_key
            if self._pending_t is not None and not (
                key == pk or (isinstance(key, float) and isinstance(pk, float) and key < pk)
            ):
                self._flush()
            if self._pending_t is None:
                if t < self.last_t:
                    t, w = self.last_t, self.last_wall
                self._pending_t, self._pending_wall, self._pending_key = t, w, key
            self._pending[q] = (v, good)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._pending_t is not None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.quiet_s, self._flush)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending_t is None:
            return
        t, wall = self._pending_t, self._pending_wall
        self._pending_t = self._pending_key = None
        bad = []
        for q, (v, good) in self._pending.items():
            if good:
                self.values[q] = _plain(v)
            else:
                self.values.pop(q, None)
                bad.append(q)
        self._pending.clear()
        self.last_t, self.last_wall = t, wall
        self.emit(Reading(self.device_id, t, wall, dict(self.values), tuple(bad)))

    # ----------------------------------------------------------------------- session

    async def _nodes(self, client: Client) -> dict[str, Any]:
        nodes = {}
        for q, text in self.node_ids.items():
            node = client.get_node(await resolve_node_id(client, text))
            try:
                await node.read_browse_name()
            except ua.UaStatusCodeError as exc:
                if self.nodemap.points[q].optional:
                    log.info("%s: optional point %s (%s) not on the server: %s", self.device_id, q, text, exc)
                    continue
                raise DeviceError(f"{self.device_id}: node {text} for {q!r} not readable: {exc}") from None
            nodes[q] = node
        return nodes

    async def _initial(self, nodes: dict[str, Any]) -> None:
        """Read every value once. On the first connection the snapshot is stamped at receipt
        (what happened before the agent started is unknown); after a reconnect each value keeps
        its SourceTimestamp (clamped as always), so a change made during the outage is placed
        at its own instant, not at the reconnection."""
        since_outage = self.last_t > float("-inf")
        changes = []
        for q, node in nodes.items():
            dv = await node.read_data_value(raise_on_bad_status=False)
            good = dv.StatusCode is None or dv.StatusCode.is_good()
            src = dv.SourceTimestamp if since_outage else None
            changes.append((q, dv.Value.Value if dv.Value is not None else None, src, good))
        self._apply(changes)
        self._flush()

    async def _follow_subscription(self, client: Client, nodes: dict[str, Any], stop: asyncio.Event) -> None:
        by_node = {node.nodeid: q for q, node in nodes.items()}
        period_ms = self.clock.real_seconds(self.interval_s) * 1000.0
        sub = await client.create_subscription(period_ms, None, queue_maxsize=10000)
        async with sub:
            await sub.subscribe_data_change(list(nodes.values()), queuesize=100, sampling_interval=0)
            while not stop.is_set():
                first = await sub.next_event(timeout=self.timeout_s)
                if first is None:  # quiet: make sure the server is still there
                    await asyncio.wait_for(client.nodes.server_state.read_value(), self.timeout_s)
                    continue
                batch = [first]
                while len(batch) < 1000:
                    ev = await sub.next_event(timeout=BATCH_WINDOW_S)
                    if ev is None:
                        break
                    batch.append(ev)
                changes = []
                for ev in batch:
                    if isinstance(ev, StatusChangeEvent):
                        raise DeviceError(f"{self.device_id}: subscription status {ev.notification.Status}")
                    if not isinstance(ev, DataChangeEvent):
                        continue
                    q = by_node.get(ev.node.nodeid)
                    if q is None:
                        continue
                    dv = ev.data.monitored_item.Value
                    good = dv.StatusCode is None or dv.StatusCode.is_good()
                    changes.append((q, ev.value, dv.SourceTimestamp, good))
                if changes:
                    self._apply(changes)

    async def _follow_polling(self, client: Client, nodes: dict[str, Any], stop: asyncio.Event) -> None:
        names = list(nodes)
        seen: dict[str, Any] = {}
        while not stop.is_set():
            dvs = [await nodes[q].read_data_value(raise_on_bad_status=False) for q in names]
            changes = []
            for q, dv in zip(names, dvs):
                good = dv.StatusCode is None or dv.StatusCode.is_good()
                key = (dv.Value.Value if dv.Value is not None else None, good)
                if seen.get(q) != key:
                    seen[q] = key
                    changes.append((q, key[0], dv.SourceTimestamp, good))
            if changes:
                self._apply(changes)
            await sleep_or_stop(stop, self.clock.real_seconds(self.interval_s))

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, follow, reconnect; returns when ``stop`` is set."""
        backoff = 0.0
        down_since: float | None = None
        while not stop.is_set():
            client = Client(self.endpoint, timeout=self.timeout_s)
            try:
                await client.connect()
                try:
                    nodes = await self._nodes(client)
                    await self._initial(nodes)
                    if down_since is not None:
                        log.info("%s: back after %.1f s", self.device_id, asyncio.get_running_loop().time() - down_since)
                        down_since = None
                    self.available, backoff = True, 0.0
                    if self.mode == "subscribe":
                        await self._follow_subscription(client, nodes, stop)
                    else:
                        await self._follow_polling(client, nodes, stop)
                finally:
                    self._flush()
                    try:
                        await asyncio.wait_for(client.disconnect(), self.timeout_s)
                    except Exception:  # the connection may already be gone
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # asyncua, OSError, timeouts: all mean "device unavailable"
                self.available = False
                if down_since is None:
                    down_since = asyncio.get_running_loop().time()
                    log.warning("%s: unavailable (%s: %s)", self.device_id, type(exc).__name__, exc)
                    self.emit(Reading(self.device_id, self.clock.mono(), self.clock.wall(), error=str(exc) or type(exc).__name__))
                backoff = min(self.backoff[1], max(self.backoff[0], backoff * 2))
                await sleep_or_stop(stop, backoff)
