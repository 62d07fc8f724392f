"""Drains the ledger's outbox to MQTT: QoS 1, a row is marked sent only on PUBACK.

The ledger is the queue: while the broker or the network is down nothing is lost, records
simply stay unsent, and on reconnect the outbox is drained oldest first with many messages in
flight at once (not one round trip per record). A record published twice (PUBACK lost, agent
killed after sending) is harmless: its record id and its InfluxDB point are the same.

A PUBACK only says the broker has the record. A broker that loses its store (a restart with
fresh persistence, a disk swap) loses what it held for an offline bridge. With
``confirm_by`` the agent therefore waits for the bridges' own confirmations (published after
their store accepted the point, see ``energy_agent.bridge.bridge``): a record sent but not confirmed within
``resend_after_s`` is published again, and all of them at once when the broker comes back
without our session (its store is new).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from energy_agent.core.clock import wait_any
from energy_agent.core.errors import DeliveryError
from energy_agent.core.record import parse_record
from energy_agent.delivery.mqtt import MqttClient
from energy_agent.records.ledger import Ledger

log = logging.getLogger(__name__)


def confirm_topic(record_topic_: str) -> str:
    """<prefix>/<site>/<agent>/confirm for a record's topic <prefix>/<site>/<agent>/<machine>/record."""
    return record_topic_.rsplit("/", 2)[0] + "/confirm"


def parse_confirmation(payload: bytes) -> tuple[str, list[str]]:
    """(by, record ids) of a confirmation message; ValueError when it is not one."""
    try:
        msg = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("by"), str) or not isinstance(msg.get("records"), list):
        raise ValueError("expected {\"by\": name, \"records\": [record ids]}")
    ids = msg["records"]
    if not all(isinstance(r, str) and 0 < len(r) <= 200 for r in ids):
        raise ValueError("records must be record id strings")
    return msg["by"], ids


class Publisher:
    def __init__(self, ledger: Ledger, client: MqttClient, *, topic_prefix: str, max_inflight: int = 100,
                 publish_timeout_s: float = 10.0, batch: int = 500, retry_max_s: float = 30.0,
                 confirm_by: frozenset[str] = frozenset(), resend_after_s: float = 300.0,
                 confirm_topic: str | None = None):
        self.ledger = ledger
        self.client = client
        self.prefix = topic_prefix
        self.confirm_by = frozenset(confirm_by)
        self.resend_after_s = resend_after_s
        self.confirm_topic = confirm_topic
        if self.confirm_by and not confirm_topic:
            raise ValueError("confirm_by needs the confirm topic")
        self.confirmed = 0
        self.resent = 0
        self._connections = 0
        self._bad_confirmations = 0
        self.max_inflight = max_inflight
        self.timeout = publish_timeout_s
        self.batch = batch
        self.retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self.sent = 0
        self.resend_cutoff = float("-inf")
        """The resend cut-off (UTC s) of the last outbox scan: every unconfirmed record sent
        before it has been published again by now."""

    def notify(self) -> None:
        """A record was committed: drain now rather than at the next periodic check."""
        self._wake.set()

    def _topic(self, body: str) -> str:
        """The record's topic, from the record itself (a record stored before a site or agent id
        change goes to its own topic)."""
        return parse_record(body).topic(self.prefix)

    async def _send(self, rows: list[tuple[int, str, str]], ahead: int = 0) -> tuple[list[int], Exception | None]:
        # The stored canonical JSON goes out as it is (no re-encoding); paho keeps max_inflight
        # on the wire and queues the rest, and the whole batch is awaited at once. The timeout
        # grows with what is on the wire before the batch's last message (``ahead``: the batch
        # before it): a slow link needs time for many round trips of max_inflight.
        items = [(self._topic(b), b.encode()) for _, _, b in rows]
        timeout = self.timeout * max(1.0, (len(items) + ahead) / self.max_inflight)
        results = await self.client.publish_many(items, qos=1, timeout=timeout)
        ok = [rid for (rid, _, _), res in zip(rows, results) if res is None]
        errors = [res for res in results if isinstance(res, BaseException)]
        return ok, (errors[0] if errors else None)

    async def _until_connected(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.client.connected:
            try:
                await self.client.wait_connected(1.0)
            except DeliveryError:
                pass

    async def _new_connection(self) -> None:
        """Once per (re)connection: a broker without our session has a new store, so whatever it
        acknowledged but no bridge confirmed may be gone: publish it again now."""
        self._connections = self.client.connections
        if self.confirm_by and not self.client.session_present:
            n = await self.ledger.resend_unconfirmed()
            if n:
                self.resent += n
                log.warning("the broker has no session of ours (new or wiped store): publishing %d sent but "
                            "unconfirmed records again", n)

    async def _confirmations(self, stop: asyncio.Event) -> None:
        """Store the bridges' confirmations (the topic is subscribed on every connection)."""
        assert self.confirm_topic is not None
        try:
            await self.client.subscribe(self.confirm_topic, qos=1)
        except DeliveryError as exc:  # kept by the client and issued again on every reconnect
            if self.client.connected:
                log.error("cannot subscribe to confirmations on %s: %s", self.confirm_topic, exc)
        while not stop.is_set():
            msg = await self.client.next_message(timeout=0.5)
            if msg is None:
                continue
            try:
                by, ids = parse_confirmation(msg.payload)
            except ValueError as exc:
                if not self._bad_confirmations:
                    log.warning("ignoring a malformed confirmation on %s: %s (further ones are counted)",
                                msg.topic, exc)
                self._bad_confirmations += 1
                continue
            if by not in self.confirm_by:
                continue  # a bridge this agent does not wait for
            try:
                self.confirmed += await self.ledger.confirm(ids, by, self.confirm_by)
            except Exception as exc:  # noqa: BLE001 - the record is then simply published again later
                log.error("cannot store confirmations from %s: %s", by, exc)

    async def run(self, stop: asyncio.Event) -> None:
        listener = None
        if self.confirm_by:
            listener = asyncio.create_task(self._confirmations(stop), name="confirmations")
        try:
            await self._drain(stop)
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def _due(self, resend_before: float | None, flight: _Flight | None) -> list[tuple[int, str, str]]:
        """The next batch of the outbox, without the rows of the batch still on the wire (they are
        not marked sent yet, so the ledger returns them again)."""
        if flight is None:
            return await self.ledger.outbox_due(self.batch, resend_before)
        rows = await self.ledger.outbox_due(self.batch + len(flight.ids), resend_before)
        return [row for row in rows if row[0] not in flight.ids][:self.batch]

    def _start(self, rows: list[tuple[int, str, str]], resend_before: float | None,
               flight: _Flight | None) -> _Flight:
        ahead = 0 if flight is None else len(flight.ids)
        task = asyncio.ensure_future(self._send(rows, ahead))
        return _Flight(frozenset(rid for rid, _, _ in rows), task, resend_before)

    async def _land(self, flight: _Flight) -> Exception | None:
        """Wait for a batch's PUBACKs and mark what the broker acknowledged sent; its first error."""
        try:
            ok, err = await flight.task
        except Exception as exc:  # noqa: BLE001 - logged by _drain; its rows are simply sent again
            ok, err = [], exc
        await self.ledger.mark_sent(ok)
        self.sent += len(ok)
        if flight.resend_before is not None and err is None:
            self.resend_cutoff = flight.resend_before
        return err

    async def _drain(self, stop: asyncio.Event) -> None:
        """Two batches overlap: the next one is read and published while the last one awaits
        its PUBACKs, and marked sent meanwhile; the ledger's commit (an fsync) and the outbox
        read no longer leave the link idle. Messages go out in outbox order all the same."""
        backoff = 0.0
        flight: _Flight | None = None
        try:
            while not stop.is_set():
                self._wake.clear()
                if self.client.connected and self.client.connections != self._connections:
                    if flight is not None:
                        await self._land(flight)  # sent on the old connection: failed or acknowledged
                        flight = None
                    await self._new_connection()
                resend_before = time.time() - self.resend_after_s if self.confirm_by else None
                rows = await self._due(resend_before, flight)
                nxt = self._start(rows, resend_before, flight) if rows else None
                if flight is None and nxt is not None:
                    flight = nxt
                    continue  # read the next batch while this one is on the wire
                if flight is None:
                    if resend_before is not None:
                        self.resend_cutoff = resend_before
                    wait = min(5.0, self.resend_after_s / 4) if self.confirm_by else 5.0
                    await wait_any(self._wake, stop, wait)
                    continue
                err = await self._land(flight)
                flight = nxt
                if err is None:
                    backoff = 0.0
                    continue
                if flight is not None:  # no new batch while the link is in trouble
                    await self._land(flight)
                    flight = None
                if not isinstance(err, DeliveryError):
                    log.error("publishing failed unexpectedly: %r", err)
                if not self.client.connected:
                    await self._until_connected(stop)  # drain again as soon as the broker is back
                    continue
                backoff = min(self.retry_max_s, max(0.5, backoff * 2))
                await wait_any(self._wake, stop, backoff)
        finally:
            if flight is not None:
                if flight.task.done() or not asyncio.current_task().cancelling():
                    await self._land(flight)
                else:
                    flight.task.cancel()


@dataclass(frozen=True, slots=True)
class _Flight:
    """A batch awaiting its PUBACKs."""

    ids: frozenset[int]
    task: asyncio.Future
    resend_before: float | None
