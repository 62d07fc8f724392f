"""``energy-agent bridge``: job records from MQTT into InfluxDB, none lost, each point once.

The bridge subscribes with a persistent session (clean start off, its own client id) and
acknowledges a message to the broker only after InfluxDB accepted its point. While InfluxDB is
down it retries with capped exponential backoff and keeps the messages unacknowledged, so a
stopped or killed bridge loses nothing: the broker redelivers. A redelivered record writes the
same point again, which overwrites itself (docs/CONTRACTS.md).

A payload that is not a valid record (not JSON, not the record schema, a field of the wrong
type, on the wrong topic, or refused by InfluxDB on its own) is never written and never
silently dropped: it is appended to the dead-letter file (JSON lines: time, topic, reason,
payload), counted, logged once per kind of problem, and then acknowledged. Replaying the file
is a matter of publishing its payloads again once the cause is fixed.

With ``influx.confirm_as`` set, the bridge then publishes the ids of the records written to
``<prefix>/<site>/<agent>/confirm`` (``{"by": name, "records": [...]}``), so that agents
that wait for it (``mqtt.confirm_by``) know the record is in the store, not only in the broker.

Several bridges can split the load with a shared subscription
(``subscription: $share/<group>/energy/v1/+/+/+/record``): the broker hands each message to
one of them. They write the same store and confirm under one ``confirm_as`` name.

Messages arriving within ``batch_window_s`` of each other (up to ``batch_max``) go to
InfluxDB in one write, as line protocol built straight from the record
(:func:`energy_agent.bridge.lineproto.record_line`). The next batch is
decoded while the last one is being written; writes, and the acknowledgements after them, stay
one batch at a time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from energy_agent.bridge.config import BridgeSettings
from energy_agent.bridge.influx import InfluxWriter, WriteRejected
from energy_agent.bridge.lineproto import measurement_of, record_line
from energy_agent.core.clock import sleep_or_stop
from energy_agent.core.errors import ConfigError, DeliveryError, RecordError
from energy_agent.core.record import canonical_json, parse_record
from energy_agent.delivery.mqtt import Message, client_from_config
from energy_agent.delivery.outbox import confirm_topic

log = logging.getLogger(__name__)

BATCH_MAX = 500
BATCH_WINDOW_S = 0.05
SWITCH_INTERVAL_S = 0.0005
"""sys.setswitchinterval of the bridge process (see run_bridge)."""
RETRY_MIN_S = 0.25
RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Converted:
    line: bytes
    """The record's point in line protocol (``lineproto.record_line``)."""
    record_id: str
    confirm_topic: str
    """Where this record's confirmation goes: <prefix>/<site>/<agent>/confirm."""


class Bridge:
    def __init__(self, settings: BridgeSettings, *, dead_letter_path: Path | str | None = None,
                 batch_max: int = BATCH_MAX, batch_window_s: float = BATCH_WINDOW_S,
                 retry_min_s: float = RETRY_MIN_S, retry_max_s: float = RETRY_MAX_S):
        self.settings = settings
        self.influx_cfg = settings.influx
        self.dead_letter_path = Path(dead_letter_path) if dead_letter_path else settings.dead_letter_path()
        self.batch_max = max(1, batch_max)
        self.batch_window_s = batch_window_s
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.client_id = settings.client_id()
        self.client = client_from_config(settings.mqtt, settings.base, client_id=self.client_id, manual_ack=True,
                                         clean_start=False, receive_maximum=2 * self.batch_max)
        self.writer = InfluxWriter.from_config(settings.influx)
        self.written = 0
        """Points InfluxDB accepted (replays and redeliveries count again)."""
        self.confirm_as = settings.influx.confirm_as
        self.confirmations = 0
        """Record ids confirmed to their agents."""
        self.dead: Counter[str] = Counter()
        """Dead-lettered messages by kind: 'not JSON', 'not a record', 'wrong topic', 'rejected'."""
        self._failing_since: float | None = None
        self.ready = asyncio.Event()
        """Set once connected and subscribed (when "bridge running" is logged)."""

    # ------------------------------------------------------------------ conversion

    def convert(self, msg: Message) -> Converted | tuple[str, str]:
        """The point of a message, or ``(kind, reason)`` why it is not a record."""
        try:
            rec = parse_record(msg.payload)
        except RecordError as exc:
            text = str(exc)
            return ("not JSON", text.removeprefix("not JSON: ")) if text.startswith("not JSON") else ("not a record", text)
        try:
            line = record_line(rec, measurement_of(rec, self.influx_cfg.measurement,
                                                   self.influx_cfg.interval_measurement))
        except RecordError as exc:
            return "not a record", str(exc)
        expected = [rec.site, rec.agent, rec.machine, "record"]
        if msg.topic.split("/")[-4:] != expected:
            return "wrong topic", f"the record of {'/'.join(expected[:3])} came on {msg.topic!r}"
        return Converted(line, rec.record_id, confirm_topic(msg.topic))

    def _dead_letter(self, msg: Message, kind: str, reason: str) -> None:
        """Append the message to the dead-letter file (OSError if that fails)."""
        try:
            payload: dict = {"payload": msg.payload.decode("utf-8")}
        except UnicodeDecodeError:
            payload = {"payload_base64": base64.b64encode(msg.payload).decode()}
        entry = {"received": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "topic": msg.topic,
                 "kind": kind, "reason": f"{kind}: {reason}", **payload}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dead_letter_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if kind not in self.dead:
            log.warning("dead-lettered a message on %s to %s: %s: %s (further ones of this kind are counted, "
                        "not logged)", msg.topic, self.dead_letter_path, kind, reason)
        self.dead[kind] += 1

    async def _reject(self, msg: Message, kind: str, reason: str, stop: asyncio.Event) -> bool:
        """Dead-letter and acknowledge; retries while the file cannot be written. False: stopping."""
        delay = self.retry_min_s
        logged = False
        while True:
            try:
                await asyncio.to_thread(self._dead_letter, msg, kind, reason)  # append + fsync: not on the loop
                break
            except OSError as exc:
                if not logged:
                    log.error("cannot write the dead-letter file %s (%s); the message stays unacknowledged, "
                              "retrying", self.dead_letter_path, exc)
                    logged = True
            if await sleep_or_stop(stop, delay):
                return False
            delay = min(self.retry_max_s, delay * 2)
        self.client.ack(msg)
        return True

    # ------------------------------------------------------------------ writing

    async def _write(self, points: list, stop: asyncio.Event) -> WriteRejected | None | bool:
        """Write until InfluxDB accepts (None), rejects the points (WriteRejected) or we stop (False)."""
        delay = self.retry_min_s
        while True:
            try:
                await self.writer.write(points)
            except WriteRejected as exc:
                self._recovered()
                return exc
            except DeliveryError as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("write to InfluxDB failed (%s); retrying with backoff up to %g s, the messages "
                                "stay unacknowledged", exc, self.retry_max_s)
                if await sleep_or_stop(stop, delay):
                    return False
                delay = min(self.retry_max_s, delay * 2)
                continue
            self._recovered()
            return None

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info("InfluxDB accepts writes again after %.1f s", time.monotonic() - self._failing_since)
            self._failing_since = None

    async def _deliver(self, items: list[tuple[Message, object]], stop: asyncio.Event) -> bool:
        """Write the points, then acknowledge their messages. False: stopping (nothing more acked)."""
        if not items:
            return True
        result = await self._write([c.line for _, c in items], stop)
        if result is False:
            return False
        if result is None:
            self.client.ack_many([msg for msg, _ in items])
            self.written += len(items)
            if self.confirm_as:
                await self._confirm([c for _, c in items])
            return True
        if len(items) == 1:  # InfluxDB refuses this very point
            return await self._reject(items[0][0], "rejected", str(result), stop)
        for item in items:  # find the point(s) InfluxDB refuses; the others are written (again: idempotent)
            if not await self._deliver([item], stop):
                return False
        return True

    async def _confirm(self, items: list[Converted]) -> None:
        """Tell the agents which records their store accepted. A confirmation that does not reach
        the broker only means the agent publishes the record again later: written again, same point."""
        by_topic: dict[str, list[str]] = {}
        for c in items:
            by_topic.setdefault(c.confirm_topic, []).append(c.record_id)
        for topic, ids in by_topic.items():
            try:
                await self.client.publish(topic, canonical_json({"by": self.confirm_as, "records": ids}), qos=1,
                                          timeout=5.0)
                self.confirmations += len(ids)
            except DeliveryError as exc:
                log.debug("confirmation of %d records on %s not delivered: %s", len(ids), topic, exc)

    async def _convert_batch(self, batch: list[Message], stop: asyncio.Event) -> list | None:
        """The batch's records with their points; what is not a record is dead-lettered (and
        acknowledged) on the way. None: stopping."""
        items = []
        for msg in batch:
            res = self.convert(msg)
            if isinstance(res, tuple):
                if not await self._reject(msg, *res, stop):
                    return None
            else:
                items.append((msg, res))
        return items

    async def _collect(self) -> list[Message]:
        first = await self.client.next_message(timeout=0.25)
        if first is None:
            return []
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_window_s
        while len(batch) < self.batch_max:
            left = deadline - loop.time()
            msg = await self.client.next_message(timeout=max(0.0, left))
            if msg is None:
                break
            batch.append(msg)
        return batch

    # ------------------------------------------------------------------ main loop

    async def _pipeline(self, stop: asyncio.Event) -> None:
        """Collect and convert the next batch while the previous one is being written.

        Writes stay one at a time and in order (a batch is handed over only when the one before
        it is written and acknowledged), so nothing is acknowledged before its point is stored;
        only the decoding of the next batch overlaps the HTTP round trip of the last one.
        """
        writing: asyncio.Task | None = None
        try:
            while not stop.is_set():
                batch = await self._collect()
                if not batch:
                    continue
                items = await self._convert_batch(batch, stop)
                if items is None:
                    break
                if writing is not None and not await writing:
                    break  # stopping: what is not acknowledged is redelivered to the next run
                writing = asyncio.create_task(self._deliver(items, stop))
            if writing is not None:
                await writing  # soon, stop being set: a write in progress ends, no more retries
        finally:
            if writing is not None and not writing.done():  # leaving on an error: nothing more to ack
                writing.cancel()
                await asyncio.wait([writing])

    def _check_dead_letter_file(self) -> None:
        try:
            self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dead_letter_path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError(f"bridge dead-letter file {self.dead_letter_path}: cannot write: {exc.strerror or exc}") from exc

    async def _connect(self, stop: asyncio.Event) -> bool:
        try:
            await self.client.connect(timeout=10.0)
            return True
        except DeliveryError as exc:
            log.warning("%s; still trying (paho reconnects in the background)", exc)
        while not stop.is_set():
            try:
                await self.client.wait_connected(0.5)
                return True
            except DeliveryError:
                pass
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge until ``stop`` is set. Unacknowledged messages are redelivered to the next run."""
        self._check_dead_letter_file()
        ic = self.influx_cfg
        try:
            if not await self._connect(stop):
                return
            try:
                await self.client.subscribe(ic.subscription, qos=1)
            except DeliveryError:
                if self.client.connected:
                    raise  # refused by the broker: a bridge without its subscription is useless
                # lost the connection meanwhile: the subscription is issued again on reconnect
            target = ic.database if ic.api == "v1" else ic.bucket
            log.info("bridge running: %s -> %s (%s, %s) as %s, dead letters to %s", ic.subscription, ic.url,
                     ic.api, target, self.client_id, self.dead_letter_path)
            self.ready.set()
            await self._pipeline(stop)
        finally:
            await self.client.close()
            self.writer.close()
            log.info("bridge stopped: %d points written, dead letters: %s", self.written,
                     ", ".join(f"{k} {n}" for k, n in sorted(self.dead.items())) or "none")


async def run_bridge(settings: BridgeSettings, stop: asyncio.Event, *,
                     dead_letter_path: Path | str | None = None) -> int:
    """Entry point of ``energy-agent bridge -c plant.yaml``: run until ``stop`` is set.

    The process is the bridge's alone, so it may shorten the interpreter's thread switch
    interval: the HTTP write runs in a thread while the loop decodes the next batch, and with
    the default 5 ms each hand-over of the GIL to that thread (connect, send, every read) can
    wait that long, which stretched writes of 500 points (about 11 ms on their own) several-fold
    and left the bridge waiting for its writes.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    await Bridge(settings, dead_letter_path=dead_letter_path).run(stop)
    return 0
