"""A small asyncio adapter over paho-mqtt (its own network thread).

paho's thread calls back into the event loop with ``call_soon_threadsafe``; nothing from paho
crosses this module: failures become :class:`DeliveryError`. ``publish`` returns only when
the broker has acknowledged the message (PUBACK for QoS 1), so a caller can mark a record
sent knowing the broker has it; many publishes may be in flight at once. Subscribers may take
acknowledgement into their own hands (``manual_ack``): a message is then acknowledged only
when ``ack`` is called, e.g. after it was written to a database.

Sessions are persistent by default (MQTT 5 clean start off with a session expiry), so a
subscriber that reconnects gets what was queued for it meanwhile. An outage is logged once
when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import DeliveryError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Tls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class MqttClient:
    def __init__(self, *, host: str, port: int, client_id: str, keepalive: int = 30, clean_start: bool = False,
                 session_expiry_s: int = 7 * 24 * 3600, username: str | None = None, password: str | None = None,
                 tls: Tls | None = None, will: tuple[str, bytes, int, bool] | None = None, max_inflight: int = 100,
                 manual_ack: bool = False, protocol: str = "5"):
        self.host, self.port, self.client_id = host, port, client_id
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.v5 = protocol == "5"
        self._c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                              protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                              clean_session=None if self.v5 else clean_start, manual_ack=manual_ack)
        self._c.reconnect_delay_set(1, 30)
        self._c.max_inflight_messages_set(max_inflight)
        self._c.max_queued_messages_set(0)
        if username is not None:
            self._c.username_pw_set(username, password)
        if tls is not None:
            self._c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            self._c.will_set(*will)
        self._c.on_connect = self._cb_connect
        self._c.on_disconnect = self._cb_disconnect
        self._c.on_publish = self._cb_publish
        self._c.on_message = self._cb_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._pending: dict[int, asyncio.Future] = {}
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._subs: dict[str, int] = {}
        self._started = False
        self._down_since: float | None = None
        self._last_error = "not connected yet"
        self.reconnects = 0

    # ------------------------------------------------------------ paho thread → loop

    def _post(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._post(self._down, f"connection refused: {reason_code}")
            return
        for topic, qos in list(self._subs.items()):
            client.subscribe(topic, qos)
        self._post(self._up)

    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._post(self._down, f"disconnected: {reason_code}")

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._post(self._acked, mid, str(reason_code) if reason_code.is_failure else None)

    def _cb_message(self, client, userdata, msg) -> None:
        self._post(self._queue.put_nowait, Message(msg.topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain)))

    # ------------------------------------------------------------ loop side

    def _up(self) -> None:
        if self._down_since is not None and self._started:
            log.info("MQTT %s:%d: connected again after %.1f s", self.host, self.port, time.monotonic() - self._down_since)
            self.reconnects += 1
        self._down_since = None
        self._connected.set()

    def _down(self, reason: str) -> None:
        self._last_error = reason
        if self._connected.is_set():
            log.warning("MQTT %s:%d: %s; retrying", self.host, self.port, reason)
            self._down_since = time.monotonic()
        elif self._down_since is None:
            self._down_since = time.monotonic()
        self._connected.clear()

    def _acked(self, mid: int, failure: str | None) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            if failure:
                fut.set_exception(DeliveryError(f"broker refused message {mid}: {failure}"))
            else:
                fut.set_result(None)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise DeliveryError(f"MQTT {self.host}:{self.port}: {self._last_error} (after {timeout:g} s)") from None

    async def connect(self, timeout: float = 10.0) -> None:
        """Start the network thread (once) and wait for the broker; it keeps retrying after a timeout."""
        if not self._started:
            self._loop = asyncio.get_running_loop()
            props = None
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0 if self.clean_start else self.session_expiry_s
            try:
                self._c.connect_async(self.host, self.port, self.keepalive,
                                      clean_start=self.clean_start if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                      properties=props)
            except (OSError, ValueError) as exc:
                raise DeliveryError(f"MQTT {self.host}:{self.port}: {exc}") from exc
            self._c.loop_start()
            self._started = True
        await self.wait_connected(timeout)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1: PUBACK)."""
        info = self._c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise DeliveryError(f"publish to {topic}: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        fut = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = fut
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(info.mid, None)
            raise DeliveryError(f"publish to {topic}: no acknowledgement within {timeout:g} s "
                                f"({'connected' if self.connected else self._last_error})") from None

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subs[topic_filter] = qos
        if self.connected:
            rc, _ = self._c.subscribe(topic_filter, qos)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise DeliveryError(f"subscribe {topic_filter}: {paho.error_string(rc)}")

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            yield await self._queue.get()

    async def next_message(self, timeout: float | None = None) -> Message | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def ack(self, msg: Message) -> None:
        """Acknowledge a message received with manual_ack (PUBACK to the broker)."""
        if msg.qos > 0:
            self._c.ack(msg.mid, msg.qos)

    async def close(self) -> None:
        if self._started:
            self._c.disconnect()
            await asyncio.get_running_loop().run_in_executor(None, self._c.loop_stop)
            self._started = False
