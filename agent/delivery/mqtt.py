"""A small asyncio adapter over paho-mqtt 2.x (paho's own network thread, no aiomqtt).

Only paho's public API is used (its client methods, its callbacks, ``MQTTMessage``,
``Properties``, ``ReasonCode``), so any paho-mqtt 2.x with that API will do. paho's thread
hands its events to the event loop (``call_soon_threadsafe``, once per burst); all state lives
on the loop side. Nothing from paho crosses this module: failures become
:class:`DeliveryError`.

* ``publish`` returns only when the broker has acknowledged the message (PUBACK for QoS 1), so
  a caller can mark a record sent knowing the broker has it. Many publishes may be awaited at
  once (``asyncio.gather``, or :meth:`MqttClient.publish_many`): paho keeps up to
  ``max_inflight`` on the wire and queues the rest. While disconnected, ``publish`` fails at
  once (nothing piles up inside paho), and a connection loss fails every publish still waiting
  for its PUBACK. A publish that failed may still reach the broker later (paho resends what was
  on the wire when it reconnects): callers must treat "failed" as "maybe delivered" — records
  are idempotent, so a retry is harmless.
* Subscribers may take acknowledgement into their own hands (``manual_ack=True``): a message
  is then acknowledged only when :meth:`MqttClient.ack` is called, e.g. after it was written to
  a database. A message received on an earlier connection is never acknowledged: the broker
  redelivers it on the new one and that copy is acknowledged instead.
* Sessions are persistent by default (MQTT 5 clean start off with a session expiry), so a
  subscriber that reconnects gets what was queued for it meanwhile. Subscriptions are kept and
  issued again on every reconnect. paho reconnects by itself with capped backoff.
* A message whose topic is not valid UTF-8 (a broker should never pass one on) is dropped with
  a log line, and acknowledged so that it does not come back.
* An outage is logged once when it starts (WARNING, with the cause) and once when it ends
  (INFO, with how long it lasted); never per message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from energy_agent.core.errors import DeliveryError

log = logging.getLogger(__name__)

SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another client connected with our client id
FLAP_S = 5.0
FLAP_COUNT = 3
EVENT_POLL_S = 0.002
"""While paho's events keep coming, the loop collects them this often (see MqttClient._post)."""


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS to the broker; all None = verify the broker against the system's CA store."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class MqttClient:
    def __init__(self, *, host: str, port: int, client_id: str, keepalive: int = 30, clean_start: bool = False,
                 session_expiry_s: int = 7 * 24 * 3600, username: str | None = None, password: str | None = None,
                 tls: Tls | bool | None = None, will: tuple[str, bytes, int, bool] | None = None,
                 max_inflight: int = 100, manual_ack: bool = False, protocol: str = "5",
                 reconnect_min_s: int = 1, reconnect_max_s: int = 30, receive_maximum: int | None = None):
        """``protocol`` "5" (default) or "3.1.1"; ``will`` = (topic, payload, qos, retain);
        ``receive_maximum`` (MQTT 5) caps how many unacknowledged QoS>0 messages the broker sends us."""
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"MQTT protocol must be '5' or '3.1.1', not {protocol!r}")
        self.host, self.port, self.client_id = host, port, client_id
        self.where = f"MQTT {host}:{port} ({client_id})"
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.v5 = protocol == "5"
        self.manual_ack = manual_ack
        self._c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                              protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                              clean_session=None if self.v5 else clean_start, manual_ack=manual_ack)
        self._c.reconnect_delay_set(reconnect_min_s, reconnect_max_s)
        self._c.max_inflight_messages_set(max_inflight)
        self._c.max_queued_messages_set(0)  # unbounded, and bounded anyway: publish refuses while disconnected
        if username is not None:
            self._c.username_pw_set(username, password)
        if tls:
            t = tls if isinstance(tls, Tls) else Tls()
            try:
                self._c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise DeliveryError(f"{self.where}: TLS setup: {exc}") from exc
        if will is not None:
            try:
                self._c.will_set(*will)
            except (ValueError, TypeError) as exc:
                raise DeliveryError(f"{self.where}: will {will[0]!r}: {exc}") from exc
        self._c.on_pre_connect = self._cb_pre_connect
        self._c.on_connect = self._cb_connect
        self._c.on_connect_fail = self._cb_connect_fail
        self._c.on_disconnect = self._cb_disconnect
        self._c.on_publish = self._cb_publish
        self._c.on_subscribe = self._cb_subscribe
        self._c.on_message = self._cb_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[tuple] = []
        self._events_lock = threading.Lock()
        self._wake_pending = False
        self._generation = 0
        """Which connection paho's thread is on: bumped (under _generation_lock) when one ends and
        before the next begins. A message remembers the generation it arrived on; ack sends its
        PUBACK only while that connection lasts (see _ack_locked)."""
        self._generation_lock = threading.Lock()
        self._connected = asyncio.Event()
        self._refused = asyncio.Event()
        self._pending: dict[int, asyncio.Future] = {}
        self._pending_subs: dict[int, tuple[str, asyncio.Future | None]] = {}
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._subs: dict[str, int] = {}
        self._unacked: dict[int, tuple[Message, int]] = {}
        self._started = False
        self._closing = False
        self._ever_connected = False
        self._down_since: float | None = None
        self._up_since = 0.0
        self._short_lived = 0
        self._flapping = False
        self._last_error = "not connected yet"
        self.reconnects = 0
        self.connections = 0
        """Connections made so far (CONNACKs): watch it to act once per new connection."""
        self.session_present = False
        self.bad_topics = 0
        """Messages dropped because their topic was not valid UTF-8."""

    # ------------------------------------------------------------ paho thread → loop

    def _post(self, fn, *args) -> None:
        """Queue an event for the loop, in order. Events arriving in a burst (a PUBACK per
        record while the outbox drains, a message per record in the bridge) wake the loop once,
        not once each: the loop runs them all in one callback, and while they keep coming it
        collects them every EVENT_POLL_S instead of being woken again."""
        loop = self._loop
        if loop is None:
            return
        with self._events_lock:
            self._events.append((fn, args))
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            loop.call_soon_threadsafe(self._run_events)
        except RuntimeError:  # the loop was closed under us (interpreter shutting down)
            pass

    def _run_events(self) -> None:
        with self._events_lock:
            events, self._events = self._events, []
            if not events:  # quiet again: the next event wakes the loop
                self._wake_pending = False
                return
        self._loop.call_later(EVENT_POLL_S, self._run_events)  # more are probably on their way
        for fn, args in events:
            try:
                fn(*args)
            except Exception:  # one bad event must not swallow the ones after it
                log.exception("%s: handling a client event failed", self.where)

    def _next_generation(self) -> None:
        with self._generation_lock:
            self._generation += 1

    def _cb_pre_connect(self, client, userdata) -> None:
        self._next_generation()

    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._post(self._on_refused, f"connection refused by the broker: {reason_code}")
        else:
            self._post(self._on_up, bool(flags.session_present))

    def _cb_connect_fail(self, client, userdata) -> None:
        self._post(self._on_connect_fail)

    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._next_generation()
        self._post(self._on_down, getattr(reason_code, "value", None), str(reason_code),
                   bool(flags.is_disconnect_packet_from_server))

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._post(self._on_puback, mid, str(reason_code) if reason_code.is_failure else None)

    def _cb_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        failures = [str(rc) for rc in reason_code_list if rc.is_failure]
        self._post(self._on_suback, mid, failures)

    def _cb_message(self, client, userdata, msg) -> None:
        # Runs on paho's thread, which an exception would stop: the topic is decoded here.
        try:
            topic = msg.topic
        except UnicodeDecodeError as exc:
            self._post(self._on_bad_topic, msg.mid, msg.qos, self._generation, str(exc))
            return
        self._post(self._on_message, Message(topic, msg.payload, msg.qos, msg.mid, bool(msg.retain)),
                   self._generation)

    # ------------------------------------------------------------ loop side

    def _on_up(self, session_present: bool) -> None:
        if self._connected.is_set():
            # paho lost the last connection without an on_disconnect (its socket went away under
            # its select): the same as a loss reported in order.
            self._mark_down("connection lost")
        self.session_present = session_present
        self.connections += 1
        if not self._ever_connected:
            log.info("%s: connected (session present: %s)", self.where, session_present)
        elif self._down_since is not None:
            log.log(logging.DEBUG if self._flapping else logging.INFO,
                    "%s: connected again after %.1f s (session present: %s)", self.where,
                    time.monotonic() - self._down_since, session_present)
            self.reconnects += 1
        self._ever_connected = True
        self._up_since = time.monotonic()
        self._down_since = None
        self._refused.clear()
        self._connected.set()
        for topic, qos in self._subs.items():
            try:
                self._send_subscribe(topic, qos, None)
            except DeliveryError as exc:
                log.error("%s", exc)

    def _on_refused(self, reason: str) -> None:
        self._mark_down(reason)
        self._refused.set()

    def _on_connect_fail(self) -> None:
        if not self._last_error.startswith("connection refused by the broker"):
            self._last_error = "cannot reach the broker"
        self._mark_down(self._last_error)

    def _on_down(self, code: int | None, reason: str, from_server: bool) -> None:
        if self._closing:
            self._connected.clear()
            return
        if code == SESSION_TAKEN_OVER and not self._flapping:
            log.error("%s: another client connected with the same client id and took this session over; "
                      "every client (agent, each bridge) needs its own client id", self.where)
        self._mark_down(f"connection lost: {reason}" + (" (sent by the broker)" if from_server else ""))

    def _mark_down(self, reason: str) -> None:
        self._last_error = reason
        if self._connected.is_set():
            # A connection dropped within seconds, again and again, is usually a second client
            # with the same client id (the broker closes the older one): say so once, then keep quiet.
            if time.monotonic() - self._up_since < FLAP_S:
                self._short_lived += 1
            else:
                self._short_lived, self._flapping = 0, False
            if self._short_lived >= FLAP_COUNT and not self._flapping:
                self._flapping = True
                log.error("%s: the connection was dropped within %g s of connecting %d times in a row (%s): "
                          "is another client using client id %r? Every client (the agent, each bridge) needs "
                          "its own; further drops are logged at DEBUG until a connection lasts",
                          self.where, FLAP_S, self._short_lived, reason, self.client_id)
            log.log(logging.DEBUG if self._flapping else logging.WARNING,
                    "%s: %s; reconnecting (messages stay queued)", self.where, reason)
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._connected.clear()
        # What was received on the lost connection is redelivered on the next one.
        self._unacked.clear()
        self._fail_pending(f"{reason} before the broker acknowledged it")

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for mid, fut in pending.items():
            if not fut.done():
                fut.set_exception(DeliveryError(f"{self.where}: message {mid}: {why}"))
        subs, self._pending_subs = self._pending_subs, {}
        for topic, fut in subs.values():
            if fut is not None and not fut.done():
                fut.set_exception(DeliveryError(f"{self.where}: subscribe {topic}: {why} "
                                                "(it is issued again on reconnect)"))

    def _on_puback(self, mid: int, failure: str | None) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            if failure:
                fut.set_exception(DeliveryError(f"{self.where}: the broker refused message {mid}: {failure}"))
            else:
                fut.set_result(None)

    def _on_suback(self, mid: int, failures: list[str]) -> None:
        topic, fut = self._pending_subs.pop(mid, ("?", None))
        if failures:
            err = DeliveryError(f"{self.where}: the broker refused the subscription {topic}: {', '.join(failures)}")
            if fut is None:
                log.error("%s", err)
            elif not fut.done():
                fut.set_exception(err)
        elif fut is not None and not fut.done():
            fut.set_result(None)

    def _on_message(self, msg: Message, generation: int) -> None:
        if self.manual_ack and msg.qos > 0:
            self._unacked[msg.mid] = (msg, generation)
        self._queue.put_nowait(msg)

    def _on_bad_topic(self, mid: int, qos: int, generation: int, why: str) -> None:
        self.bad_topics += 1
        log.log(logging.WARNING if self.bad_topics == 1 else logging.DEBUG,
                "%s: dropped message %d: its topic is not valid UTF-8 (%s)%s", self.where, mid, why,
                "; further ones are logged at DEBUG" if self.bad_topics == 1 else "")
        if self.manual_ack and qos > 0:
            with self._generation_lock:
                self._ack_locked(mid, qos, generation)

    def _send_subscribe(self, topic: str, qos: int, fut: asyncio.Future | None) -> bool:
        """Send SUBSCRIBE now; False when paho has no connection (it is sent on reconnect)."""
        try:
            rc, mid = self._c.subscribe(topic, qos)
        except ValueError as exc:
            raise DeliveryError(f"{self.where}: subscribe {topic!r}: {exc}") from exc
        if rc == paho.MQTT_ERR_NO_CONN:
            return False
        if rc != paho.MQTT_ERR_SUCCESS:
            raise DeliveryError(f"{self.where}: subscribe {topic}: {paho.error_string(rc)}")
        self._pending_subs[mid] = (topic, fut)
        return True

    def _ack_locked(self, mid: int, qos: int, generation: int) -> None:
        """PUBACK a message if paho is still on the connection it arrived on (the caller holds
        _generation_lock). paho's thread bumps the generation in on_disconnect and on_pre_connect,
        before it clears its output queue for a new connection: an ack queued on the old
        generation is either written on the old connection or dropped with it, never sent on the
        new one, where the message id may belong to another message."""
        if generation == self._generation:
            self._c.ack(mid, qos)

    # ------------------------------------------------------------ API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        return self._last_error

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected; DeliveryError with the last reason after ``timeout``."""
        if self.connected:
            return
        if not self._started:
            raise DeliveryError(f"{self.where}: not started (call connect first)")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError as exc:
            raise DeliveryError(f"{self.where}: not connected after {timeout:g} s: {self._last_error}") from exc

    async def connect(self, timeout: float = 10.0) -> None:
        """Start the network thread (once) and wait for the broker's CONNACK.

        On a refusal (bad credentials, ...) or after ``timeout`` this raises DeliveryError with
        the reason, but paho keeps trying in the background: a later ``wait_connected`` may
        succeed without calling ``connect`` again.
        """
        if not self._started:
            self._loop = asyncio.get_running_loop()
            self._closing = False
            props = None
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0 if self.clean_start else self.session_expiry_s
                if self.receive_maximum:
                    props.ReceiveMaximum = self.receive_maximum
            try:
                self._c.connect_async(self.host, self.port, self.keepalive,
                                      clean_start=self.clean_start if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                      properties=props)
                self._c.loop_start()
            except (OSError, ValueError) as exc:
                raise DeliveryError(f"{self.where}: {exc}") from exc
            self._started = True
        if self.connected:
            return
        up = asyncio.ensure_future(self._connected.wait())
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            await asyncio.wait({up, refused}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            refused.cancel()
        if self.connected:
            return
        if self._refused.is_set():
            raise DeliveryError(f"{self.where}: {self._last_error}")
        detail = await asyncio.to_thread(_probe, self.host, self.port)
        raise DeliveryError(f"{self.where}: not connected after {timeout:g} s: {detail}")

    def _publish_now(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Hand a message to paho; its message id, or DeliveryError when it cannot be sent."""
        if not self.connected:
            raise DeliveryError(f"{self.where}: publish to {topic}: not connected ({self._last_error})")
        try:
            info = self._c.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:  # bad topic, payload too large
            raise DeliveryError(f"{self.where}: publish to {topic!r}: {exc}") from exc
        # NO_CONN: paho's thread lost the connection before the loop heard of it; paho keeps the
        # message and resends it on reconnect, and the loss fails this publish on the loop.
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise DeliveryError(f"{self.where}: publish to {topic}: {paho.error_string(info.rc)}")
        return info.mid

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      timeout: float = 10.0) -> None:
        """Publish and return when the broker has acknowledged it (QoS 1: PUBACK).

        DeliveryError when not connected, when the connection is lost before the PUBACK, when
        the broker refuses the message, or after ``timeout`` seconds.
        """
        mid = self._publish_now(topic, payload, qos, retain)
        if qos == 0:
            return
        # paho's thread may already have the PUBACK, but it reaches us through the loop: after this.
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as exc:
            raise DeliveryError(f"{self.where}: publish to {topic}: no acknowledgement within {timeout:g} s "
                                f"({'connected' if self.connected else self._last_error})") from exc
        finally:
            if self._pending.get(mid) is fut:
                del self._pending[mid]

    async def publish_many(self, items: list[tuple[str, bytes]], qos: int = 1,
                           timeout: float = 10.0) -> list[DeliveryError | None]:
        """Publish many messages at once and wait for all their acknowledgements together (one
        wait, not one per message: the outbox drain after an outage). Per message: None when the
        broker acknowledged it, else the DeliveryError (not connected, refused, lost connection,
        nothing within ``timeout``)."""
        loop = asyncio.get_running_loop()
        slots: list[asyncio.Future | DeliveryError] = []
        for topic, payload in items:
            try:
                mid = self._publish_now(topic, payload, qos, False)
            except DeliveryError as exc:
                slots.append(exc)
                continue
            fut = loop.create_future()
            if qos == 0:
                fut.set_result(None)
            else:
                self._pending[mid] = fut
            slots.append(fut)
        waiting = [f for f in slots if isinstance(f, asyncio.Future)]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        out: list[DeliveryError | None] = []
        for slot in slots:
            if isinstance(slot, DeliveryError):
                out.append(slot)
            elif not slot.done():
                slot.cancel()
                out.append(DeliveryError(f"{self.where}: no acknowledgement within {timeout:g} s "
                                         f"({'connected' if self.connected else self._last_error})"))
            else:
                exc = slot.exception()
                out.append(exc if isinstance(exc, DeliveryError) or exc is None else DeliveryError(str(exc)))
        if any(not f.done() or f.cancelled() for f in waiting):
            self._pending = {mid: f for mid, f in self._pending.items() if not f.done()}
        return out

    async def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe (kept, and issued again on every reconnect).

        Connected: returns on the broker's SUBACK (DeliveryError if it refuses). Not connected:
        returns at once; the subscription is sent when the connection is (re)established.
        """
        _check_filter(topic_filter)
        self._subs[topic_filter] = qos
        if not self.connected:
            return
        fut = asyncio.get_running_loop().create_future()
        if not self._send_subscribe(topic_filter, qos, fut):
            return
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as exc:
            raise DeliveryError(f"{self.where}: subscribe {topic_filter}: no SUBACK within {timeout:g} s") from exc

    async def next_message(self, timeout: float | None = None) -> Message | None:
        """The next received message, or None after ``timeout`` seconds."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def ack(self, msg: Message) -> None:
        """Acknowledge a message received with ``manual_ack`` (PUBACK to the broker).

        A message from an earlier connection is not acknowledged (the broker redelivers it and
        the new copy is); QoS 0 messages and clients without manual_ack need no ack.
        """
        self.ack_many([msg])

    def ack_many(self, msgs: list[Message]) -> None:
        """:meth:`ack` each message."""
        if not self.manual_ack:
            return
        with self._generation_lock:
            for msg in msgs:
                entry = self._unacked.get(msg.mid)
                if msg.qos == 0 or entry is None or entry[0] is not msg:
                    continue
                del self._unacked[msg.mid]
                self._ack_locked(msg.mid, msg.qos, entry[1])

    async def close(self) -> None:
        """Disconnect cleanly (the persistent session stays on the broker) and stop paho's thread."""
        if not self._started:
            return
        self._closing = True
        try:
            self._c.disconnect()
        except Exception:  # noqa: BLE001 - paho exceptions never leave this module
            pass
        await asyncio.to_thread(self._c.loop_stop)
        self._started = False
        self._connected.clear()
        self._unacked.clear()
        self._last_error = "closed"
        self._fail_pending("the client was closed")


def _check_filter(topic_filter: str) -> None:
    """MQTT topic filter rules: not empty; '#' alone in the last level; '+' alone in its level."""
    levels = topic_filter.split("/")
    bad = (not topic_filter or len(topic_filter.encode()) > 65535 or "\0" in topic_filter
           or any(("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
                  for i, lv in enumerate(levels)))
    if bad:
        raise DeliveryError(f"invalid MQTT topic filter {topic_filter!r}")


def _probe(host: str, port: int) -> str:
    """Why there is no MQTT connection, from a plain TCP connect (for error messages)."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return "TCP connect works, but the broker sent no CONNACK (not an MQTT broker? TLS expected?)"
    except TimeoutError:
        return "TCP connect timed out (host down or filtered)"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"


def client_from_config(cfg, base, *, client_id: str, **kw) -> MqttClient:
    """An MqttClient for ``energy_agent.app.config.MqttConfig``: TLS files relative to the config's
    directory, the password from its environment variable or file (never from the YAML)."""

    def path(p):
        return None if p is None else str(p if p.is_absolute() else base / p)

    tls = None if cfg.tls is None else Tls(path(cfg.tls.ca_file), path(cfg.tls.cert_file), path(cfg.tls.key_file))
    return MqttClient(host=cfg.host, port=cfg.port, client_id=client_id, keepalive=cfg.keepalive_s,
                      username=cfg.username, password=cfg.password(base), tls=tls, **kw)
