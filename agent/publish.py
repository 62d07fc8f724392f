"""Drains the ledger's outbox to MQTT: QoS 1, a row is marked sent only on PUBACK.

The ledger is the queue: while the broker or the network is down nothing is lost, records
simply stay unsent, and on reconnect the outbox is drained oldest first with many messages in
flight at once (not one round trip per record). A record published twice (PUBACK lost, agent
killed after sending) is harmless: its record id and its InfluxDB point are the same.
"""

from __future__ import annotations

import asyncio
import logging

from agent.errors import DeliveryError
from agent.ledger import Ledger
from agent.mqtt import MqttClient
from agent.record import canonical_json

log = logging.getLogger(__name__)


def record_topic(prefix: str, record: dict) -> str:
    return f"{prefix}/{record['site']}/{record['agent']}/{record['machine']}/record"


class Publisher:
    def __init__(self, ledger: Ledger, client: MqttClient, *, topic_prefix: str, max_inflight: int = 100,
                 publish_timeout_s: float = 10.0, batch: int = 500, retry_max_s: float = 30.0):
        self.ledger = ledger
        self.client = client
        self.prefix = topic_prefix
        self.max_inflight = max_inflight
        self.timeout = publish_timeout_s
        self.batch = batch
        self.retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self.sent = 0

    def notify(self) -> None:
        """A record was committed: drain now rather than at the next periodic check."""
        self._wake.set()

    async def _send(self, rows: list[tuple[int, dict]]) -> tuple[list[int], Exception | None]:
        sem = asyncio.Semaphore(self.max_inflight)

        async def one(rec: dict) -> None:
            async with sem:
                await self.client.publish(record_topic(self.prefix, rec), canonical_json(rec), qos=1,
                                          timeout=self.timeout)

        results = await asyncio.gather(*(one(rec) for _, rec in rows), return_exceptions=True)
        ok = [rid for (rid, _), res in zip(rows, results) if res is None]
        errors = [res for res in results if isinstance(res, BaseException)]
        return ok, (errors[0] if errors else None)

    async def _until_connected(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.client.connected:
            try:
                await self.client.wait_connected(1.0)
            except DeliveryError:
                pass

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            self._wake.clear()
            rows = await self.ledger.outbox(self.batch)
            if rows:
                ok, err = await self._send(rows)
                await self.ledger.mark_sent(ok)
                self.sent += len(ok)
                if err is None:
                    backoff = 0.0
                    continue
                if not isinstance(err, DeliveryError):
                    log.error("publishing failed unexpectedly: %r", err)
                if not self.client.connected:
                    await self._until_connected(stop)  # drain again as soon as the broker is back
                    continue
                backoff = min(self.retry_max_s, max(0.5, backoff * 2))
                wait = backoff
            else:
                wait = 5.0
            waker = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waker, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
                stopper.cancel()
