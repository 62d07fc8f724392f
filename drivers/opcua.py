"""OPC UA CNC controllers: the nodes a node map names, as a stream of snapshots.

:class:`CncDriver` connects to one server, resolves the node ids of its node map (``ns=…``
or the restart-stable ``nsu=<namespace URI>;…`` form, whose index is looked up at every
connect), reads every value once (one Read request, so one consistent snapshot) and then
follows changes through a subscription (data-change notifications with a queue, so no
intermediate change is lost between two publishes) or, where a server cannot subscribe, by
polling. Node map points given as browse paths are translated to node ids at every connect
(TranslateBrowsePathsToNodeIds), so a server that rebuilt its address space is followed.

The first snapshot of every connection is one :class:`Reading` with ``initial`` set, stamped at
its receipt: the server's state now, not a replay of what happened while the agent was away
(each value's SourceTimestamp is in ``stamps``). Every later change becomes a Reading holding
the full snapshot of all points, stamped with the server's SourceTimestamp of the change,
clamped between the previous reading and the moment it arrived; changes of one instant are
merged into one snapshot (a CNC clock that is off cannot move a job boundary outside the window
in which it was observed). A value with a Bad StatusCode is never a value: the point is absent
from the snapshot and named in ``bad``; an Uncertain one is used and named in ``bad`` (see
:class:`CncDriver`).

Security (OPC 10000-4, 5.4 and 7.36): policy Basic256Sha256 with mode Sign or SignAndEncrypt,
a client certificate and key, an optional user name and password. The server's certificate is
taken from its endpoint description and checked against the configured trust (a pinned
certificate or a folder of trusted certificates or CAs) *before* a secure channel is opened or a
password sent; an untrusted server is refused with its thumbprint in the error.

The subscription is made with the OPC UA services of asyncua's ``UaClient`` (CreateSubscription
with a callback of ours, CreateMonitoredItems), so that every publish response reaches the driver
whole, with its PublishTime: see :meth:`CncDriver._published`. A subscription that delivers
neither data changes nor keep-alives for ``watchdog_intervals`` publishing intervals (the server
sends a keep-alive after ``KEEPALIVE_COUNT`` empty intervals) counts as a lost connection.

What a device or the network can cause (:data:`DEVICE_ERRORS`) makes the device unavailable: the
driver logs once per outage and reconnects with capped backoff. Any other exception is a bug and
ends :meth:`CncDriver.run`. asyncua types and exceptions stay in this module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from asyncua import Client, ua
from asyncua.crypto import security_policies, uacrypto
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from energy_agent.core.clock import Clock, sleep_or_stop
from energy_agent.core.errors import AgentError, DeviceError
from energy_agent.core.reading import Reading
from energy_agent.drivers.nodemap import BrowsePath, NodeMap, NodeRef
from energy_agent.drivers.pki import certificate_uri, load_certificate, thumbprint

if TYPE_CHECKING:
    from energy_agent.drivers.config import CncSecurity

log = logging.getLogger(__name__)

KEEPALIVE_COUNT = 3
"""Publishing intervals without news after which the server sends a keep-alive."""
MIN_WATCHDOG_S = 2.0
"""Floor of the keep-alive watchdog in real seconds (accelerated plants have tiny intervals)."""
WRITE_SPREAD_S = 0.05
"""Real seconds within which a server is taken to have written every node of one instant (by
its ServerTimestamps). With the default ``settle_s``, an instant is complete at the end of a
publish response the server built more than this after the instant's first value reached it."""
POLICIES = {"Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256}
MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
DEVICE_ERRORS: tuple[type[BaseException], ...] = (DeviceError, ua.UaError, OSError, asyncio.TimeoutError)
"""What a device or the network can cause: our DeviceError, asyncua's UaError (a Bad status, a
ServiceError, a message that does not parse), socket errors (ConnectionError and TimeoutError
are OSErrors) and asyncio timeouts. Anything else raised while following a device is a bug."""


def _epoch(stamp: datetime) -> float:
    """An OPC UA UtcTime as seconds since the epoch (a naive datetime is UTC)."""
    return (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)).timestamp()


async def read_values(client: Client, nodes: list[Any]) -> list[ua.DataValue]:
    """The Value attributes of ``nodes`` (DataValues with their timestamps and status, Bad
    ones included) in one Read request: one round trip, and one consistent snapshot from a
    server that updates an instant's nodes together (read one by one, a snapshot taken while
    the CNC ends a job can hold the parts counter and job id of after the end and the state of
    before it). A server that refuses the request as a whole raises its status."""
    results = await client.read_attributes(nodes, ua.AttributeIds.Value)
    if len(results) != len(nodes):
        raise ua.UaError(f"Read of {len(nodes)} nodes returned {len(results)} results")
    return results


GOOD, UNCERTAIN, BAD = "good", "uncertain", "bad"
"""Quality of a value, from its StatusCode's severity (OPC 10000-4, 7.39)."""
REASON = {BAD: "bad_status", UNCERTAIN: "uncertain_status"}
"""``Reading.reasons`` code of a point that is not Good (energy_agent.core.reading.BAD_REASONS)."""


class Change(NamedTuple):
    """One value of one point as the server reported it (a Read result or a data change)."""

    point: str
    value: Any
    source: datetime | None = None
    """SourceTimestamp (None: the server sent none)."""
    quality: str = GOOD
    status: str = "Good"
    """The StatusCode's name (BadSensorFailure, UncertainLastUsableValue, ...)."""
    received: float | None = None
    """ServerTimestamp, seconds since the epoch: when the server received the value (None: not sent)."""

    @property
    def news(self) -> tuple:
        """What makes this change news: its quality, status and value (a Bad value is not one)."""
        return self.quality, self.status, None if self.quality == BAD else self.value


def change_of(point: str, dv: ua.DataValue, *, received: bool = False) -> Change:
    """A DataValue as a :class:`Change` (``received``: keep its ServerTimestamp)."""
    code = dv.StatusCode
    if code is None or code.is_good():
        quality, status = GOOD, "Good"
    else:
        quality, status = (BAD if code.is_bad() else UNCERTAIN), code.name
    srv = dv.ServerTimestamp if received else None
    return Change(point, dv.Value.Value if dv.Value is not None else None, dv.SourceTimestamp, quality, status,
                  None if srv is None else _epoch(srv))


def _plain(value: Any) -> Any:
    """Scalars as Python values: enums to int, LocalizedText to str."""
    if isinstance(value, ua.LocalizedText):
        return value.Text or ""
    if hasattr(value, "value") and isinstance(value.value, int):
        return int(value.value)
    return value


async def resolve_node_id(client: Client, text: NodeRef) -> ua.NodeId:
    """Parse 'ns=…;…' or 'nsu=URI;…' (the URI looked up on this server) into a NodeId; a
    browse path is translated by the server."""
    if isinstance(text, BrowsePath):
        (result,) = await translate_paths(client, [text])
        if isinstance(result, str):
            raise DeviceError(f"browse path {text} does not resolve: {result}")
        return result
    if text.startswith("nsu="):
        uri, _, rest = text[4:].partition(";")
        if not rest:
            raise DeviceError(f"node id {text!r}: nothing after the namespace URI")
        try:
            idx = await client.get_namespace_index(uri)
        except ValueError as exc:
            raise DeviceError(f"namespace {uri!r} is not on the server") from exc
        text = f"ns={idx};{rest}"
    try:
        return ua.NodeId.from_string(text)
    except ua.UaError as exc:  # UaStringParsingError
        raise DeviceError(f"node id {text!r}: {exc}") from exc


async def _browse_request(client: Client, path: BrowsePath, namespaces: list[str]) -> ua.BrowsePath | str:
    """One TranslateBrowsePaths request element, or why the path cannot even be asked for."""
    elements = []
    for ns, name in path.elements:
        if isinstance(ns, str):
            if ns not in namespaces:
                return f"namespace {ns!r} is not on the server"
            ns = namespaces.index(ns)
        rel = ua.RelativePathElement()
        rel.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        rel.IsInverse, rel.IncludeSubtypes = False, True
        rel.TargetName = ua.QualifiedName(name, ns)
        elements.append(rel)
    bp = ua.BrowsePath()
    try:
        bp.StartingNode = await resolve_node_id(client, path.start)
    except DeviceError as exc:
        return f"start node: {exc}"
    bp.RelativePath = ua.RelativePath()
    bp.RelativePath.Elements = elements
    return bp


async def translate_paths(client: Client, paths: list[BrowsePath]) -> list[ua.NodeId | str]:
    """Translate browse paths in one request; per path its NodeId or why it did not resolve."""
    namespaces = await client.get_namespace_array() if any(
        isinstance(ns, str) for p in paths for ns, _ in p.elements) else []
    out: list[ua.NodeId | str] = [await _browse_request(client, p, namespaces) for p in paths]
    asked = [i for i, r in enumerate(out) if isinstance(r, ua.BrowsePath)]
    if asked:
        results = await client.uaclient.translate_browsepaths_to_nodeids([out[i] for i in asked])
        for i, res in zip(asked, results):
            if res.StatusCode.is_good() and res.Targets:
                target = res.Targets[0].TargetId  # an ExpandedNodeId of a local node
                out[i] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
            else:
                out[i] = res.StatusCode.name
    return out


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _describe(cert: x509.Certificate) -> str:
    return f"subject {cert.subject.rfc4514_string()}, SHA-1 thumbprint {thumbprint(cert)}"


def check_server_trust(device_id: str, endpoint: str, cert: x509.Certificate, sec: CncSecurity) -> None:
    """Raise DeviceError unless ``cert`` is the pinned server certificate, a certificate in the
    trust folder, or issued by a CA certificate in it; and valid now."""
    now = datetime.now(timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise DeviceError(f"{device_id}: server certificate of {endpoint} is not valid now (valid "
                          f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}; {_describe(cert)})")
    trusted: list[x509.Certificate] = []
    try:
        if sec.server_certificate is not None:
            trusted.append(load_certificate(sec.server_certificate))
        if sec.trust_dir is not None:
            for f in sorted(sec.trust_dir.iterdir()):
                if f.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
                    trusted.append(load_certificate(f))
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{device_id}: security: cannot read the trusted certificates: {exc}") from exc
    der = _der(cert)
    for t in trusted:
        if _der(t) == der:
            return
        try:
            if t.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                cert.verify_directly_issued_by(t)
                return
        except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):  # not its issuer
            continue
    where = "security.server_certificate" if sec.trust_dir is None else "security.trust_dir"
    raise DeviceError(f"{device_id}: server certificate of {endpoint} is not trusted ({_describe(cert)}); "
                      f"if this is the right server, add its certificate to {where}")


def _own_uri(device_id: str, sec: CncSecurity) -> str:
    """The application URI of the configured client certificate (announced as ours)."""
    assert sec.certificate is not None and sec.private_key is not None
    for field in ("certificate", "private_key"):
        path = getattr(sec, field)
        if not path.is_file():
            raise DeviceError(f"{device_id}: security.{field}: {path} does not exist (energy-agent certs makes one)")
    try:
        uri = certificate_uri(load_certificate(sec.certificate))
    except ValueError as exc:
        raise DeviceError(f"{device_id}: security.certificate: {sec.certificate} is not a certificate: {exc}") from exc
    if not uri:
        raise DeviceError(f"{device_id}: security.certificate: {sec.certificate} has no application URI "
                          "in its subjectAltName")
    return uri


async def _endpoint_certificate(client: Client, device_id: str, endpoint: str, sec: CncSecurity) -> x509.Certificate:
    """The server certificate of the endpoint with our policy and mode (GetEndpoints over an
    unsecured discovery channel, as OPC 10000-4 5.4.4 intends)."""
    mode, policy = MODES[sec.mode], POLICIES[sec.policy]
    endpoints = await client.connect_and_get_server_endpoints()
    match = [e for e in endpoints if e.SecurityMode == mode and e.SecurityPolicyUri == policy.URI]
    if not match:
        offered = sorted({f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints})
        raise DeviceError(f"{device_id}: {endpoint} offers no {sec.policy}/{sec.mode} endpoint "
                          f"(offers: {', '.join(offered)})")
    if not match[0].ServerCertificate:
        raise DeviceError(f"{device_id}: {endpoint} sent no server certificate for {sec.policy}/{sec.mode}")
    return uacrypto.x509_from_der(match[0].ServerCertificate)  # the first of a chain is the server's


async def configure_security(client: Client, device_id: str, endpoint: str, sec: CncSecurity | None) -> None:
    """User identity and secure channel of ``client`` per ``sec``; DeviceError names the device and,
    for files, the field. Call before ``connect``: the server certificate is checked before a
    secure channel is opened or the password sent."""
    if sec is None:
        return
    if sec.username:
        try:
            password = sec.password(f"{device_id}: security")
        except AgentError as exc:
            raise DeviceError(str(exc)) from exc
        client.set_user(sec.username)
        client.set_password(password or "")
    if sec.mode == "None":
        return
    client.application_uri = _own_uri(device_id, sec)
    server_cert = await _endpoint_certificate(client, device_id, endpoint, sec)
    check_server_trust(device_id, endpoint, server_cert, sec)
    try:
        await client.set_security(POLICIES[sec.policy], str(sec.certificate), str(sec.private_key),
                                  server_certificate=_der(server_cert), mode=MODES[sec.mode])
    except (OSError, ValueError, TypeError) as exc:  # cryptography: TypeError for an encrypted key, no password
        raise DeviceError(f"{device_id}: security.private_key: cannot use {sec.private_key}: {exc}") from exc


class CncDriver:
    """Follows one CNC's node map and hands snapshots to ``emit``.

    Quality (every path: the first Read, data changes, polls): a point whose StatusCode is Bad
    is absent from ``values`` and named in ``bad`` (reason ``bad_status``); one whose StatusCode
    is Uncertain keeps its value in ``values`` and is named in ``bad`` too (reason
    ``uncertain_status``). Every reading names every point that is not Good at its instant, so a
    point is in ``bad`` from the reading its status turned to the one it is Good again, when it
    is back in ``values``. :attr:`status` holds the StatusCode names. The driver logs connection
    outages only; turning ``bad`` into availability, flags and log lines is the caller's.
    """

    def __init__(self, device_id: str, endpoint: str, nodemap: NodeMap, node_ids: dict[str, NodeRef], clock: Clock,
                 emit: Callable[[Reading], None], *, mode: str = "subscribe", interval_s: float = 0.5,
                 timeout_s: float = 4.0, timestamps: str = "source",
                 backoff_min_s: float = 1.0, backoff_max_s: float = 60.0,
                 security: CncSecurity | None = None, watchdog_intervals: float = 10.0,
                 settle_s: float | None = None):
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
        self.security = security
        self.watchdog_intervals = watchdog_intervals
        self.watchdog_trips = 0
        self.resolved: dict[str, str] = {}
        """Node id of every point found at the last connect (browse paths translated)."""
        self.subscribed = False
        """True while a subscription with its monitored items is established."""
        self.values: dict[str, Any] = {}
        """Usable value of every point (Good or Uncertain) as of the last reading."""
        self.stamps: dict[str, float] = {}
        """SourceTimestamp (s since the epoch) of every point's current value, where the server sent one."""
        self.status: dict[str, str] = {}
        """StatusCode name of every point that is not Good."""
        self._reasons: dict[str, str] = {}
        self._seen: dict[str, tuple] = {}
        """Point -> :attr:`Change.news` of its latest change (pending ones included)."""
        self.last_t = float("-inf")
        self.available = False
        self._pending: dict[str, Change] = {}
        self._pending_t: float | None = None
        self._pending_key: float | str | None = None
        self._pending_wall = 0.0
        self._pending_received: float | None = None
        self._pending_unstamped = False
        self.last_wall = 0.0
        self._batch = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self.settle_s = settle_s
        self.by_publish_time = settle_s is None and mode == "subscribe" and self.use_source
        """Default ``settle_s`` on a subscription: an instant is also complete at the end of a
        publish response built WRITE_SPREAD_S after the server received its first value."""
        self.publish_interval_s = self.clock.real_seconds(interval_s)
        """Real seconds between two publish responses (or polls): the interval asked for until a
        server grants its own (CreateSubscription's RevisedPublishingInterval)."""
        self.quiet_s = 0.0
        """Real seconds without news after which an instant is complete (default > one publishing
        interval); 0: complete at the end of the publish response or poll that brought it."""
        self.next_publish_s = 0.0
        """Real seconds within which the server's next publish response comes (one interval and
        a margin for timer and transport jitter): how long an instant whose response was built
        within WRITE_SPREAD_S of it waits, with ``by_publish_time``, for the rest of it."""
        self._pace(self.publish_interval_s)
        self._last_response = 0.0
        """time.monotonic() of the last publish response (data, keep-alive or status)."""
        self.settled = {"publish": 0, "quiet": 0}
        """Instants handed over at the end of a publish response (by PublishTime, or every one
        with settle_s 0) and after a quiet period."""

    def _pace(self, period_s: float) -> None:
        """Set the publishing interval and what depends on it: ``next_publish_s`` and, unless
        ``settle_s`` was given, the quiet period. Called with the requested interval, then with
        the one the server grants: a server that publishes less often than asked would otherwise
        have its instants handed over before their second half came. The keep-alive count plays
        no part: a response with data follows a response with data one interval later; only
        empty intervals wait for a keep-alive (it sets the watchdog, :meth:`watchdog_s`)."""
        self.publish_interval_s = period_s
        self.quiet_s = 1.5 * period_s + 0.05 if self.settle_s is None else self.clock.real_seconds(self.settle_s)
        self.next_publish_s = 1.25 * period_s + 0.05

    # ----------------------------------------------------------------------- stamping

    def _apply(self, changes: list[Change]) -> None:
        """Merge changes into per-instant snapshots.

        Changes stamped with the same instant may arrive in separate notifications (a server
        updates nodes one by one). They are merged, and the snapshot of an instant is emitted
        only when a later instant arrives or nothing has arrived for a quiet period, so the
        tracker never sees a half-applied instant (state active, job id not yet set).
        Instants are identified by their SourceTimestamp (with ``timestamps: received``, by the
        notification batch) and placed on the monotonic axis no later than their arrival and
        no earlier than the previous instant. The server time (ServerTimestamp) says when the
        server received the value: see :meth:`_published`. A change that is no news (same
        value and status as the point's latest, e.g. the first notification of a monitored
        item after the initial Read, or an unchanged value polled again) is dropped.
        """
        news = []
        for c in changes:
            if self._seen.get(c.point) != c.news:
                self._seen[c.point] = c.news
                news.append(c)
        if not news:
            return
        mono, wall = self.clock.now()
        self._batch += 1
        items = []
        for c in news:
            received = c.received
            if received is not None and c.source is not None and received == _epoch(c.source):
                received = None  # a copy of the source time, not the server's own
            if self.use_source and c.source is not None:
                key: float | str = _epoch(c.source)
                t, w = (mono - (wall - key), key) if key < wall else (mono, wall)
            else:
                key, t, w = f"batch {self._batch}", mono, wall
            items.append((t, w, key, c, received))
        items.sort(key=lambda item: item[0])
        for t, w, key, c, received in items:
            pk = self._pending_key
            if self._pending_t is not None and not (
                key == pk or (isinstance(key, float) and isinstance(pk, float) and key < pk)
            ):
                self._flush()
            if self._pending_t is None:
                if t < self.last_t:
                    t, w = self.last_t, self.last_wall
                self._pending_t, self._pending_wall, self._pending_key = t, w, key
            self._pending[c.point] = c
            if received is None:
                self._pending_unstamped = True
            elif self._pending_received is None or received < self._pending_received:
                self._pending_received = received
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._pending_t is not None:
            if self.quiet_s <= 0.0:
                self.settled["publish"] += 1
                self._flush()
            else:
                wait = self.next_publish_s if self.by_publish_time and not self._pending_unstamped else self.quiet_s
                self._flush_timer = asyncio.get_running_loop().call_later(wait, self._quiet)

    def _quiet(self) -> None:
        self._flush_timer = None
        if self._pending_t is not None:
            self.settled["quiet"] += 1
        self._flush()

    def _published(self, at: float) -> None:
        """The server built a publish response at ``at`` (its clock) and its changes are applied.

        A server that updates an instant's nodes one by one can have a response built between
        two of those updates, and the rest comes a publishing interval later. Every node of an
        instant reaches the server within WRITE_SPREAD_S of the first, so a response built later
        than that holds all of them that changed: the instant is complete without waiting. One
        built sooner is complete at the next response built later than that, or when none has
        come for ``next_publish_s`` (the server had nothing more to send). An instant with a
        value lacking a ServerTimestamp of its own waits ``quiet_s``.
        """
        if (self.by_publish_time and self._pending_t is not None and not self._pending_unstamped
                and self._pending_received is not None and at - self._pending_received > WRITE_SPREAD_S):
            self.settled["publish"] += 1
            self._flush()

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending_t is None:
            return
        t, wall = self._pending_t, self._pending_wall
        self._pending_t = self._pending_key = self._pending_received = None
        self._pending_unstamped = False
        for c in self._pending.values():
            self._set(c)
        self._pending.clear()
        self.last_t, self.last_wall = t, wall
        self._hand_over(t, wall, initial=False)

    def _set(self, c: Change) -> None:
        """Make ``c`` the point's current value, stamp and quality."""
        q = c.point
        if c.quality == BAD:
            self.values.pop(q, None)
        else:
            self.values[q] = _plain(c.value)
        if c.quality == GOOD:
            self.status.pop(q, None)
            self._reasons.pop(q, None)
        else:
            self.status[q], self._reasons[q] = c.status, REASON[c.quality]
        if c.source is None:
            self.stamps.pop(q, None)
        else:
            self.stamps[q] = _epoch(c.source)

    def _hand_over(self, t: float, wall: float, *, initial: bool) -> None:
        bad = tuple(q for q in self.node_ids if q in self._reasons)
        self.emit(Reading(self.device_id, t, wall, dict(self.values), bad, reasons=dict(self._reasons),
                          stamps=dict(self.stamps), initial=initial))

    # ----------------------------------------------------------------------- session

    async def _nodes(self, client: Client) -> dict[str, Any]:
        """The nodes of the map on this server: browse paths translated in one request, every
        node checked once. A missing optional point is logged and left out."""
        ids: dict[str, ua.NodeId | str] = {}
        paths = {q: ref for q, ref in self.node_ids.items() if isinstance(ref, BrowsePath)}
        if paths:
            for q, res in zip(paths, await translate_paths(client, list(paths.values()))):
                ids[q] = res
        nodes = {}
        for q, text in self.node_ids.items():
            optional = self.nodemap.points[q].optional
            if q in paths:
                if isinstance(ids[q], str):
                    if optional:
                        log.info("%s: optional point %s: browse path %s does not resolve: %s", self.device_id, q, text, ids[q])
                        continue
                    raise DeviceError(f"{self.device_id}: browse path {text} for {q!r} does not resolve: {ids[q]}")
                node = client.get_node(ids[q])
            else:
                node = client.get_node(await resolve_node_id(client, text))
            try:
                await node.read_browse_name()
            except ua.UaStatusCodeError as exc:
                if optional:
                    log.info("%s: optional point %s (%s) not on the server: %s", self.device_id, q, text, exc)
                    continue
                raise DeviceError(f"{self.device_id}: node {text} for {q!r} not readable: {exc}") from exc
            nodes[q] = node
        self.resolved = {q: node.nodeid.to_string() for q, node in nodes.items()}
        return nodes

    async def _initial(self, client: Client, nodes: dict[str, Any]) -> None:
        """Read every value once, in one request (:func:`read_values`), and hand the result over
        as one reading with ``initial`` set, stamped at its receipt. Its values are the server's
        state now, whatever happened before: after an outage, a job may have ended and another
        begun, and a restarted server shows each value with the SourceTimestamp of its last
        change (in ``stamps``). Applied one by one at those instants, they would make snapshots
        that never existed (the parts counter of after a job's end with the job id and state of
        before it); placing what happened unseen is the caller's, from ``stamps``."""
        dvs = await read_values(client, list(nodes.values()))
        mono, wall = self.clock.now()
        self.values.clear()
        self.stamps.clear()
        self.status.clear()
        self._reasons.clear()
        self._seen.clear()
        for q, dv in zip(nodes, dvs):
            c = change_of(q, dv)
            self._seen[q] = c.news
            self._set(c)
        if mono < self.last_t:
            mono, wall = self.last_t, self.last_wall
        self.last_t, self.last_wall = mono, wall
        self._hand_over(mono, wall, initial=True)

    def watchdog_s(self, period_s: float, keepalive_count: int = KEEPALIVE_COUNT) -> float:
        """Real seconds without a publish response (data or keep-alive) after which the
        subscription counts as lost: watchdog_intervals publishing intervals, at least
        ``keepalive_count`` (as the server revised it) + 2 of them and MIN_WATCHDOG_S."""
        return max(max(self.watchdog_intervals, keepalive_count + 2) * period_s, MIN_WATCHDOG_S)

    async def _silence(self) -> float:
        """Real seconds since the subscription's last publish response. Responses already
        received but not yet processed (our own event loop was busy) are let in first."""
        for _ in range(5):
            await asyncio.sleep(0)
        return time.monotonic() - self._last_response

    def _take(self, result: ua.PublishResult, points: dict[int, str]) -> None:
        """Apply one publish response: its data changes as one batch, then its PublishTime. A
        status change (the server's, or the client's own when the connection is lost) ends the
        subscription."""
        msg = result.NotificationMessage
        changes = []
        for data in msg.NotificationData or ():
            if isinstance(data, ua.StatusChangeNotification):
                raise DeviceError(f"{self.device_id}: subscription status {data.Status}")
            if not isinstance(data, ua.DataChangeNotification):
                continue
            for item in data.MonitoredItems:
                q = points.get(item.ClientHandle)
                if q is None:
                    continue
                changes.append(change_of(q, item.Value, received=True))
        if changes:
            self._apply(changes)
        if msg.PublishTime is not None:
            self._published(_epoch(msg.PublishTime))

    async def _subscribe(self, client: Client, nodes: dict[str, Any],
                         arrived: Callable[[ua.PublishResult], None]) -> tuple[ua.CreateSubscriptionResult, dict[int, str]]:
        """Create a subscription whose publish responses go to ``arrived``, and a monitored item
        (its value, with both timestamps, queued on the server) per point. Returns the server's
        revised parameters and the point of each client handle.

        asyncua's ``Subscription`` (Client.create_subscription) hands on the notifications of a
        response but not its PublishTime, so its services are called directly, as asyncua's
        Client documentation advises for more control. Its stale-subscription check, which only
        watches subscriptions made by Client.create_subscription, then leaves this one to the
        driver's own watchdog."""
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=self.clock.real_seconds(self.interval_s) * 1000.0,
            RequestedLifetimeCount=10000, RequestedMaxKeepAliveCount=KEEPALIVE_COUNT,
            MaxNotificationsPerPublish=10000, PublishingEnabled=True, Priority=0)
        created = await client.uaclient.create_subscription(params, arrived)
        points = dict(enumerate(nodes, start=1))
        items = [ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=nodes[q].nodeid, AttributeId=ua.AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=0.0, QueueSize=100,
                                                        DiscardOldest=True))
            for handle, q in points.items()]
        request = ua.CreateMonitoredItemsParameters(SubscriptionId=created.SubscriptionId, ItemsToCreate=items,
                                                    TimestampsToReturn=ua.TimestampsToReturn.Both)
        results = await client.uaclient.create_monitored_items(request)
        for q, res in zip(points.values(), results):
            if not res.StatusCode.is_good():
                raise DeviceError(f"{self.device_id}: the server does not monitor {q!r} "
                                  f"({self.resolved.get(q, '?')}): {res.StatusCode.name}")
        return created, points

    async def _follow_subscription(self, client: Client, nodes: dict[str, Any], stop: asyncio.Event) -> None:
        """Apply each publish response as it comes, until ``stop``, a status change or silence.
        asyncua's publish loop calls ``arrived``, which only queues the response: the work is
        done in this task, so that an error in it ends :meth:`run` instead of being logged and
        dropped by asyncua. Closing the session deletes the subscription."""
        responses: asyncio.Queue[ua.PublishResult] = asyncio.Queue()

        def arrived(result: ua.PublishResult) -> None:
            self._last_response = time.monotonic()
            responses.put_nowait(result)

        created, points = await self._subscribe(client, nodes, arrived)
        period_s = created.RevisedPublishingInterval / 1000.0
        if period_s > 0.0:
            if not math.isclose(period_s, self.publish_interval_s, rel_tol=0.01):  # once, not per reconnect
                log.info("%s: the server publishes every %.3g s (asked for %.3g s)", self.device_id, period_s,
                         self.clock.real_seconds(self.interval_s))
            self._pace(period_s)
        else:
            period_s = self.publish_interval_s
        limit = self.watchdog_s(period_s, created.RevisedMaxKeepAliveCount)
        self._last_response = time.monotonic()
        self.subscribed = True
        while not stop.is_set():
            try:
                result = await asyncio.wait_for(responses.get(), min(self.timeout_s, limit / 4))
            except asyncio.TimeoutError:
                result = None
            if result is not None:
                self._take(result, points)
                continue
            silent = await self._silence()  # quiet: the server must still publish keep-alives
            if silent > limit:
                self.watchdog_trips += 1
                raise DeviceError(
                    f"{self.device_id}: subscription silent for {silent:.1f} s: no data change or keep-alive "
                    f"(limit {limit:.1f} s: {self.watchdog_intervals:g} publishing intervals of "
                    f"{period_s:.3g} s, at least {MIN_WATCHDOG_S:g} s)")

    async def _follow_polling(self, client: Client, nodes: dict[str, Any], stop: asyncio.Event) -> None:
        """Read every value each interval; what changed (:meth:`_apply` drops the rest) becomes
        an instant, stamped with its SourceTimestamp."""
        names = list(nodes)
        while not stop.is_set():
            dvs = await read_values(client, [nodes[q] for q in names])
            self._apply([change_of(q, dv) for q, dv in zip(names, dvs)])
            await sleep_or_stop(stop, self.clock.real_seconds(self.interval_s))

    async def _secure(self, client: Client) -> None:
        """Set identity and security on a new client. The server certificate comes from its
        endpoint list (read over an unsecured discovery channel, as OPC UA intends) and must be
        trusted before anything else is sent."""
        await configure_security(client, self.device_id, self.endpoint, self.security)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, follow, reconnect; returns when ``stop`` is set. A :data:`DEVICE_ERRORS`
        error makes the device unavailable until a reconnect succeeds; any other exception
        (a bug: ours, in ``emit``, or in asyncua) ends the run with it."""
        backoff = 0.0
        down_since: float | None = None
        # Hundreds of CNCs connected together would all probe in the same instant: spread them
        # (deterministically per device) over +-10 % of the interval.
        spread = 0.9 + 0.2 * (zlib.crc32(self.device_id.encode()) / 0xFFFFFFFF)
        while not stop.is_set():
            # asyncua probes the server every watchdog_intervall; in subscribe mode the keep-alive
            # watchdog decides first, so one outage gives one warning. The interval is the one
            # the server granted last time (the requested one at first).
            probe_s = spread * max(self.timeout_s, 2.0 * self.watchdog_s(self.publish_interval_s))
            client = Client(self.endpoint, timeout=self.timeout_s, watchdog_intervall=probe_s)
            try:
                await self._secure(client)
                await client.connect()
                try:
                    nodes = await self._nodes(client)
                    await self._initial(client, nodes)
                    if down_since is not None:
                        log.info("%s: back after %.1f s", self.device_id, asyncio.get_running_loop().time() - down_since)
                        down_since = None
                    self.available, backoff = True, 0.0
                    if self.mode == "subscribe":
                        await self._follow_subscription(client, nodes, stop)
                    else:
                        await self._follow_polling(client, nodes, stop)
                finally:
                    self.subscribed = False
                    self._flush()
                    try:
                        await asyncio.wait_for(client.disconnect(), self.timeout_s)
                    except DEVICE_ERRORS:  # the connection may already be gone
                        pass
            except DEVICE_ERRORS as exc:
                self.available = False
                if down_since is None:
                    down_since = asyncio.get_running_loop().time()
                    log.warning("%s: unavailable (%s: %s)", self.device_id, type(exc).__name__, exc)
                    self.emit(Reading(self.device_id, self.clock.mono(), self.clock.wall(), error=str(exc) or type(exc).__name__))
                backoff = min(self.backoff[1], max(self.backoff[0], backoff * 2))
                await sleep_or_stop(stop, backoff)
