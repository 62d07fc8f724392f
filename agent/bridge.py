"""``energy-agent bridge``: job records from MQTT into InfluxDB, each exactly once.

It subscribes with a persistent session and acknowledges a message to the broker only after
InfluxDB accepted its point; while InfluxDB is down it retries with capped backoff and keeps
the messages unacknowledged, so a killed bridge loses nothing (the broker redelivers). A
redelivered record writes the same point again, which overwrites itself. A payload that is not
a valid record is never written and never silently dropped: it goes to a dead-letter file
(JSON lines with the reason), is counted, logged once per kind of problem, and acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

from agent.config import Loaded
from agent.errors import ConfigError, DeliveryError, RecordError
from agent.influx import InfluxWriter, record_to_point
from agent.mqtt import Message, MqttClient

log = logging.getLogger(__name__)

BATCH_MAX = 500
BATCH_WINDOW_S = 0.05


def default_client_id(cfg) -> str:
    """influx.client_id, else one per site and target store: two bridges writing to different
    stores must not share a session (the broker would keep disconnecting one of them)."""
    if cfg.influx.client_id:
        return cfg.influx.client_id
    target = f"{cfg.influx.url}|{cfg.influx.database or ''}|{cfg.influx.org or ''}|{cfg.influx.bucket or ''}"
    return f"energy-bridge-{cfg.site}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"


class Bridge:
    def __init__(self, loaded: Loaded, *, dead_letter_path: Path | None = None, batch_max: int = BATCH_MAX):
        cfg = loaded.config
        if cfg.mqtt is None:
            raise ConfigError("mqtt: the bridge needs an mqtt section")
        if cfg.influx is None:
            raise ConfigError("influx: the bridge needs an influx section")
        self.cfg = cfg
        self.influx_cfg = cfg.influx
        self.prefix = cfg.mqtt.topic_prefix
        self.dead_letter_path = dead_letter_path or loaded.base / "dead-letter.jsonl"
        self.batch_max = batch_max
        self.client = MqttClient(host=cfg.mqtt.host, port=cfg.mqtt.port, client_id=default_client_id(cfg),
                                 keepalive=cfg.mqtt.keepalive_s, manual_ack=True, clean_start=False)
        self.writer = InfluxWriter.from_config(cfg.influx)
        self.written = 0
        self.dead = Counter()

    def _dead_letter(self, msg: Message, reason: str) -> None:
        kind = reason.split(":")[0]
        if kind not in self.dead:
            log.warning("dead-lettering a message on %s: %s (further ones of this kind are counted, not logged)",
                        msg.topic, reason)
        self.dead[kind] += 1
        try:
            text = msg.payload.decode("utf-8")
            payload: dict = {"payload": text}
        except UnicodeDecodeError:
            payload = {"payload_base64": base64.b64encode(msg.payload).decode()}
        entry = {"received": time.time(), "topic": msg.topic, "reason": reason, **payload}
        self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dead_letter_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def convert(self, msg: Message):
        """The point of a message, or None after dead-lettering it."""
        try:
            rec = json.loads(msg.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._dead_letter(msg, f"not JSON: {exc}")
            return None
        try:
            point = record_to_point(rec, self.influx_cfg.measurement)
        except RecordError as exc:
            self._dead_letter(msg, f"not a record: {exc}")
            return None
        expected = f"{self.prefix}/{rec['site']}/{rec['agent']}/{rec['machine']}/record"
        if msg.topic != expected:
            self._dead_letter(msg, f"wrong topic: the record belongs on {expected}")
            return None
        return point

    async def _write(self, points: list, stop: asyncio.Event) -> bool:
        """Write until it succeeds (True) or the bridge stops (False)."""
        backoff = 0.0
        failing_since: float | None = None
        while True:
            try:
                await self.writer.write(points)
                if failing_since is not None:
                    log.info("InfluxDB accepts writes again after %.1f s", time.monotonic() - failing_since)
                return True
            except DeliveryError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("InfluxDB write failed (%s); retrying, messages stay unacknowledged", exc)
            backoff = min(30.0, max(0.25, backoff * 2))
            try:
                await asyncio.wait_for(stop.wait(), backoff)
                return False
            except asyncio.TimeoutError:
                pass

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.client.connect(timeout=10.0)
                break
            except DeliveryError as exc:
                log.warning("%s; retrying", exc)
        await self.client.subscribe(self.influx_cfg.subscription, qos=1)
        log.info("bridge running: %s -> %s (%s)", self.influx_cfg.subscription, self.influx_cfg.url, self.influx_cfg.api)
        try:
            while not stop.is_set():
                first = await self.client.next_message(timeout=0.5)
                if first is None:
                    continue
                batch = [first]
                deadline = asyncio.get_running_loop().time() + BATCH_WINDOW_S
                while len(batch) < self.batch_max:
                    left = deadline - asyncio.get_running_loop().time()
                    msg = await self.client.next_message(timeout=max(0.0, left)) if left > 0 else None
                    if msg is None:
                        break
                    batch.append(msg)
                good: list[Message] = []
                points = []
                for msg in batch:
                    point = self.convert(msg)
                    if point is None:
                        self.client.ack(msg)
                    else:
                        good.append(msg)
                        points.append(point)
                if points and not await self._write(points, stop):
                    break  # stopping: unacknowledged messages are redelivered to the next bridge
                for msg in good:
                    self.client.ack(msg)
                self.written += len(points)
        finally:
            await self.client.close()
            self.writer.close()
            log.info("bridge stopped: %d points written, dead letters %s", self.written, dict(self.dead) or 0)


async def run_bridge(loaded: Loaded, stop: asyncio.Event) -> int:
    await Bridge(loaded).run(stop)
    return 0
