"""Simulated CNC controllers: one OPC UA server with the node map's variables for each machine.

Each machine gets a folder under Objects (browse name = machine id) holding an object for its
channel and one for its production job (browse names from the node map's ``channel`` and
``job`` params, e.g. ``Channel_1`` and ``Job``), and in them the variables the node map names,
with the node ids it names (string ids in the scenario's namespace). Enumerations are Int32
(OPC 40502 values), ``parts_total`` and ``production_state`` UInt32, the rest String.

A node map point given as a browse path is created where the path says: the objects along it
(shared between machines where the paths share a prefix, e.g. ``Objects/Machines``) and the
variable at its end, each with the browse name of its path element (namespace URIs are
registered on the server).

Values follow each machine's timeline (:attr:`energy_agent.simulators.scenario.Timeline.cnc_changes`). An
update task runs every ``tick_s`` (10 ms) real seconds and publishes every change whose
instant has passed, in order, each with its *exact* instant as SourceTimestamp (anchor +
change time; ServerTimestamp = the real time of the write, the server's clock as in its publish
responses). All nodes changing at one instant share one SourceTimestamp and are written at once,
or ``write_spread_s`` apart (a server that updates them one by one). When the task falls
behind, each intermediate change is still written on its own, so a subscriber with a queue
observes every one of them.

Faults of kind ``cnc_bad_status`` become events: at ``from_s`` the point's value is sent with
the fault's StatusCode (default BadSensorFailure; the last value stays in the DataValue, as real
servers do: with a Bad status a client must not use it, with UncertainLastUsableValue it is the
last usable value), at ``to_s`` the value of that instant with Good.

A ``cnc_restart`` fault stops the server at ``from_s`` (sessions closed, port closed) and serves
a new one from ``to_s``, prepared meanwhile: the scenario namespace is registered after as many
extra namespaces as restarts so far (its index moves, as on a real server whose configuration
changed), and each value is that of ``to_s`` with the SourceTimestamp of its last change, so
the jobs that ended or began while it was down show as done.

``min_publishing_interval_s`` makes the server revise shorter requested publishing intervals up
to it (RevisedPublishingInterval), as servers with a minimum interval do.

With :class:`ServerSecurity` the server has a certificate and offers the Basic256Sha256 Sign and
SignAndEncrypt endpoints (and None, unless left out); it can require a user name and password
and accept only client certificates found in a folder.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from energy_agent.core.clock import Clock
from energy_agent.core.errors import ConfigError
from energy_agent.drivers.nodemap import ROOTS, BrowsePath
from energy_agent.simulators.scenario import MachineSim, Scenario

log = logging.getLogger(__name__)

VARIANT = {
    "channel_status": ua.VariantType.Int32, "program_status": ua.VariantType.Int32,
    "operation_mode": ua.VariantType.Int32, "parts_total": ua.VariantType.UInt32,
    "channel_state": ua.VariantType.Int32, "channel_mode": ua.VariantType.Int32,
    "production_state": ua.VariantType.UInt32,
}
"""Variant type per point; points not listed are strings."""
TICK_S = 0.01


@dataclass(frozen=True)
class NotGood:
    """The value of a point while a cnc_bad_status fault holds: the last value shown before,
    sent with this StatusCode."""

    status: str = "BadSensorFailure"

    def __repr__(self) -> str:
        return self.status


BAD = NotGood()
"""The default: BadSensorFailure."""


def _production_state(v: dict[str, Any]) -> int:
    """OPC 40501-1 ProductionStateMachine number from the OPC 40502 channel values."""
    running = {1: 1, 2: 1, 3: 3, 4: 4}  # Running, Waiting -> Running; Interrupted; Canceled -> Aborted
    if v["program_status"] in running:
        return running[v["program_status"]]
    return 0 if v["channel_status"] == 0 else 2  # stopped: Initializing while active (setup), else Ended


DERIVED: dict[str, Callable[[dict[str, Any]], Any]] = {
    # OPC 40501-1 points (opc40501 node map) from the timeline's OPC 40502 values
    "channel_state": lambda v: v["channel_status"],    # ChannelState = CncChannelStatus (Active, Interrupted, Reset)
    "channel_mode": lambda v: v["operation_mode"],     # ChannelMode 0..2 = CncOperationMode 0..2 (Automatic, MDA, JOG)
    "production_state": _production_state,
}
"""Points some node maps name that the timeline does not: computed from its values."""


def cnc_events(scenario: Scenario, machine: MachineSim) -> list[tuple[float, dict[str, Any]]]:
    """What one CNC publishes: ``[(-inf, initial values), (t, changed values), ...]`` in time
    order, with the :data:`DERIVED` points its node map names. The one place CNC faults act: a
    ``cnc_bad_status`` fault becomes changes at its from_s (the point becomes :data:`BAD`) and
    to_s (the value of that instant comes back)."""
    changes = machine.timeline.cnc_changes
    faults = [f for f in scenario.faults_of(machine.id, "cnc") if f.kind == "cnc_bad_status"]
    derived = {q: f for q, f in DERIVED.items() if q in machine.cnc.node_map_model.points}
    if not faults and not derived:
        return changes
    points = set(changes[0][1]) | set(derived)
    for f in faults:
        if f.point is not None and f.point not in points:
            raise ConfigError(f"faults: {f.kind} on {machine.id}: point {f.point!r} is not a CNC point "
                              f"(known: {', '.join(sorted(points))})")
    times = sorted({t for t, _ in changes} | {f.from_s for f in faults} | {f.to_s for f in faults if f.to_s})
    out: list[tuple[float, dict[str, Any]]] = []
    truth: dict[str, Any] = {}
    shown: dict[str, Any] = {}
    k = 0
    for t in times:
        while k < len(changes) and changes[k][0] <= t:
            truth.update(changes[k][1])
            k += 1
        want = dict(truth)
        want.update({q: f(truth) for q, f in derived.items()})
        for f in faults:
            if f.active(t):
                for q in [f.point] if f.point else list(want):
                    want[q] = NotGood(f.status) if f.status else BAD
        changed = {q: v for q, v in want.items() if q not in shown or shown[q] != v}
        if changed:
            out.append((t, changed))
            shown.update(changed)
    return out


def restart_windows(scenario: Scenario) -> list[tuple[float, float]]:
    """When the server is down: the union of every ``cnc_restart`` fault's [from_s, to_s), in
    order (the server serves every CNC, so a fault named for any machine stops it)."""
    out: list[tuple[float, float]] = []
    for a, b in sorted((f.from_s, f.to_s) for f in scenario.faults if f.kind == "cnc_restart"):
        assert b is not None  # cnc_restart requires to_s
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class ServerSecurity:
    """Security of the simulated CNC server."""

    certificate: Path
    private_key: Path
    modes: tuple[str, ...] = ("None", "Sign", "SignAndEncrypt")
    """Endpoints offered: None, and Basic256Sha256 with Sign and/or SignAndEncrypt."""
    users: dict[str, str] = field(default_factory=dict)
    """user name -> password; empty: anonymous sessions."""
    trusted_clients: Path | None = None
    """Folder of accepted client certificates (.der/.pem); None: any client certificate."""
    application_uri: str = "urn:energy-agent:simulator"
    """Must be the URI in the server certificate's subjectAltName."""


class _Users:
    """Accepts exactly the configured user names with their passwords."""

    def __init__(self, users: dict[str, str], logins: list[str]):
        self.users = dict(users)
        self.logins = logins

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        self.logins.append(username or "")
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User)
        return None


def _client_validator(folder: Path):
    """A certificate validator accepting client certificates found in ``folder`` (read at each
    session, so a certificate copied there later is accepted)."""

    async def validate(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        der = cert.public_bytes(serialization.Encoding.DER)
        for f in sorted(folder.iterdir()):
            try:
                data = f.read_bytes()
                other = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN")
                         else x509.load_der_x509_certificate(data))
            except (OSError, ValueError):  # not a certificate: ignored
                continue
            if other.public_bytes(serialization.Encoding.DER) == der:
                return
        log.warning("CNC simulator: client certificate %s (%s) refused: not trusted",
                    cert.subject.rfc4514_string(), app.ApplicationUri)
        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    return validate


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def _grant_at_least(server: Server, floor_ms: float) -> None:
    """Make ``server`` revise every requested publishing interval up to ``floor_ms``, as a server
    with a minimum interval does. asyncua grants what is asked and has no setting for a
    minimum, so its subscription service's public create_subscription is wrapped to raise the
    request first (the server then publishes at the revised interval and reports it)."""
    service = server.iserver.subscription_service
    create = service.create_subscription

    async def create_at_least(params: ua.CreateSubscriptionParameters, *args: Any, **kwargs: Any) -> Any:
        params.RequestedPublishingInterval = max(params.RequestedPublishingInterval, floor_ms)
        return await create(params, *args, **kwargs)

    service.create_subscription = create_at_least


class CncBank:
    """Serves every CNC of a scenario from one OPC UA server."""

    def __init__(self, scenario: Scenario, clock: Clock, *, host: str = "127.0.0.1", port: int = 4840,
                 tick_s: float = TICK_S, security: ServerSecurity | None = None, write_spread_s: float = 0.0,
                 min_publishing_interval_s: float = 0.0):
        self.scenario = scenario
        self.min_publishing_interval_s = min_publishing_interval_s
        """Real seconds: a subscription asking for a shorter publishing interval is granted this
        one (RevisedPublishingInterval), as servers with a minimum do; 0: what is asked."""
        self.write_spread_s = write_spread_s
        """Real seconds between the node writes of one instant (0: all at once). A server that
        updates an instant's nodes one by one can split them over two publish responses."""
        self.security = security
        self.clock = clock
        self.host = host
        self.port = port
        self.tick_s = tick_s
        self.server: Server | None = None
        """The server serving, or being prepared while a restart fault holds."""
        self.serving = False
        self.restarts = restart_windows(scenario)
        """[from_s, to_s) windows in which the server is down (``cnc_restart`` faults)."""
        self.first_served_s: float | None = None
        """Scenario time the bank first served: the SourceTimestamp of values that never changed."""
        self.restart_count = 0
        """Restarts so far; as many extra namespaces are registered before the scenario's."""
        self.namespace_index = 0
        """Index of the scenario namespace on the current server."""
        self.nodes: dict[str, dict[str, ua.NodeId]] = {}
        self.logins: list[str] = []
        """User names of every session activation attempt (with ``security.users``)."""
        self.shown: dict[str, dict[str, Any]] = {}
        """Last good value per machine and point (sent along with a Bad status)."""
        self.events = {m.id: cnc_events(scenario, m) for m in scenario.machines}
        self._next: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self.writes = 0
        self.max_batch = 0
        """Most changes of one machine published in one tick (> 1: the task caught up)."""
        self.write_spans: dict[tuple[str, float], float] = {}
        """With ``write_spread_s``: real seconds from the first to the last write of each instant,
        (machine, scenario time) -> span, by the ServerTimestamps written (what a client sees of
        the server's pace; a busy event loop stretches it beyond the spread asked for)."""

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    def sim_time(self) -> float:
        return self.clock.wall() - self.clock.anchor

    async def _ns(self, server: Server, idx: dict[str, int], ns: int | str) -> int:
        if isinstance(ns, int):
            return ns
        if ns not in idx:
            idx[ns] = await server.register_namespace(ns)
        return idx[ns]

    async def _node_id(self, server: Server, idx: dict[str, int], text: str) -> ua.NodeId:
        if text.startswith("nsu="):
            uri, rest = text[4:].split(";", 1)
            text = f"ns={await self._ns(server, idx, uri)};{rest}"
        return ua.NodeId.from_string(text)

    async def _along(self, server: Server, idx: dict[str, int], folder: Any, path: BrowsePath) -> tuple[Any, ua.QualifiedName, ua.NodeId]:
        """The parent of a browse path's last element (creating the objects on the way), the
        last element's browse name and a node id for it."""
        if path.start in ROOTS.values():
            parent = server.get_node(ua.NodeId.from_string(path.start))
        else:
            start = await self._node_id(server, idx, path.start)
            parent = server.get_node(start)
            try:
                await parent.read_browse_name()
            except ua.UaStatusCodeError:  # an object the map starts from: make it in the machine's folder
                name = str(start.Identifier).rsplit(".", 1)[-1]
                parent = await folder.add_object(start, ua.QualifiedName(name, start.NamespaceIndex))
        key = path.start
        names = [ua.QualifiedName(name, await self._ns(server, idx, ns)) for ns, name in path.elements]
        for qn in names[:-1]:
            key += f"/{qn.NamespaceIndex}:{qn.Name}"
            try:
                parent = await parent.get_child(qn)
            except ua.UaStatusCodeError:
                parent = await parent.add_object(ua.NodeId(key, qn.NamespaceIndex), qn)
        last = names[-1]
        return parent, last, ua.NodeId(f"{key}/{last.NamespaceIndex}:{last.Name}", last.NamespaceIndex)

    async def _build(self, server: Server, idx: dict[str, int], m: MachineSim) -> None:
        ns = idx[self.scenario.namespace]
        nm = m.cnc.node_map_model
        ids = nm.resolve({"namespace": self.scenario.namespace, "channel": m.cnc.channel, "job": m.cnc.job,
                          "machine": m.id})
        folder = await server.nodes.objects.add_folder(ua.NodeId(m.id, ns), ua.QualifiedName(m.id, ns))
        parents: dict[str, Any] = {}
        initial = self.events[m.id][0][1]
        self.nodes[m.id] = {}
        for point, ref in ids.items():
            if point not in initial:
                log.warning("%s: node map point %r is not simulated; node %s not created", m.id, point, ref)
                continue
            vt = VARIANT.get(point, ua.VariantType.String)
            if isinstance(ref, BrowsePath):
                parent, qn, nodeid = await self._along(server, idx, folder, ref)
                node = await parent.add_variable(nodeid, qn, ua.Variant(initial[point], vt))
                self.nodes[m.id][point] = node.nodeid
                continue
            nodeid = await self._node_id(server, idx, ref)
            parent, browse = folder, point
            if nodeid.NodeIdType == ua.NodeIdType.String:
                browse = nodeid.Identifier
                for prefix in (m.cnc.channel, m.cnc.job):
                    if nodeid.Identifier.startswith(prefix + "."):
                        if prefix not in parents:
                            parents[prefix] = await folder.add_object(
                                ua.NodeId(prefix, nodeid.NamespaceIndex),
                                ua.QualifiedName(prefix.rsplit(".", 1)[-1], nodeid.NamespaceIndex))
                        parent, browse = parents[prefix], nodeid.Identifier[len(prefix) + 1:]
                        break
            node = await parent.add_variable(nodeid, ua.QualifiedName(browse, nodeid.NamespaceIndex),
                                             ua.Variant(initial[point], vt))
            self.nodes[m.id][point] = node.nodeid

    async def _secure(self, server: Server) -> None:
        sec = self.security
        if sec is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
            return
        await server.load_certificate(str(sec.certificate))
        await server.load_private_key(str(sec.private_key))
        await server.set_application_uri(sec.application_uri)
        kinds = {"None": ua.SecurityPolicyType.NoSecurity,
                 "Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                 "SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
        server.set_security_policy([kinds[k] for k in sec.modes])
        if sec.users:
            server.iserver.set_user_manager(_Users(sec.users, self.logins))
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        if sec.trusted_clients is not None:
            server.set_certificate_validator(_client_validator(sec.trusted_clients))

    async def _prepare(self) -> Server:
        """A new server with its address space and security, not yet listening. After a restart
        the scenario namespace comes after ``restart_count`` other ones, so at another index (a
        client must look it up by URI, as ``nsu=`` node ids do)."""
        server = Server()
        await server.init()  # ~2 s
        server.set_endpoint(self.endpoint)
        server.set_server_name("energy-agent CNC simulator")
        await self._secure(server)
        for k in range(self.restart_count):
            await server.register_namespace(f"urn:energy-agent:simulator:restart-{k + 1}")
        self.namespace_index = await server.register_namespace(self.scenario.namespace)
        idx = {self.scenario.namespace: self.namespace_index}
        for m in self.scenario.machines:
            await self._build(server, idx, m)
        if self.min_publishing_interval_s > 0:
            _grant_at_least(server, self.min_publishing_interval_s * 1000.0)
        return server

    async def _serve(self) -> None:
        """Show the values of now (each with the instant it last changed) and start listening."""
        assert self.server is not None
        now = self.sim_time()
        if self.first_served_s is None:
            self.first_served_s = now
        for m in self.scenario.machines:
            await self._show_initial(m.id, now)
        await self.server.start()
        self.serving = True

    def _down_at(self, t: float) -> tuple[float, float] | None:
        """The restart window holding scenario time t, if any."""
        return next(((a, b) for a, b in self.restarts if a <= t < b), None)

    async def start(self) -> None:
        """Build the address space, show the values of now, start serving and updating (inside a
        restart window: serving starts at its end)."""
        if self.port == 0:
            self.port = free_port(self.host)  # the endpoint URL the server announces must be the real one
        self.server = await self._prepare()  # scenario time is read after it
        if self._down_at(self.sim_time()) is None:
            await self._serve()
        self._task = asyncio.create_task(self._run(), name="cnc-updates")

    async def _show_initial(self, machine: str, now: float) -> None:
        """Values at ``now``, each stamped with the instant it last changed (if never: when the
        bank first served, the same after a restart); a point under a cnc_bad_status fault with
        the last good value before it."""
        values: dict[str, tuple[Any, float]] = {}
        good = self.shown.setdefault(machine, {})
        i = 0
        events = self.events[machine]
        while i < len(events) and events[i][0] <= now:
            t, changed = events[i]
            for q, v in changed.items():
                values[q] = (v, t if math.isfinite(t) else self.first_served_s)
                if not isinstance(v, NotGood):
                    good[q] = v
            i += 1
        self._next[machine] = i
        for q, (v, t) in values.items():
            await self._write(machine, q, v, _utc(self.clock.anchor + t))

    async def _write(self, machine: str, point: str, value: Any, stamp: datetime) -> datetime | None:
        """Write one node; returns the ServerTimestamp given (None: the node map has no such point)."""
        nodeid = self.nodes[machine].get(point)
        if nodeid is None:
            return None
        assert self.server is not None
        vt = VARIANT.get(point, ua.VariantType.String)
        if isinstance(value, NotGood):
            last = self.shown.setdefault(machine, {}).get(point)
            dv = ua.DataValue(ua.Variant(last, vt) if last is not None else ua.Variant(),
                              StatusCode=ua.StatusCode(getattr(ua.StatusCodes, value.status)),
                              SourceTimestamp=stamp, ServerTimestamp=datetime.now(timezone.utc))
        else:
            self.shown.setdefault(machine, {})[point] = value
            dv = ua.DataValue(ua.Variant(value, vt), SourceTimestamp=stamp, ServerTimestamp=datetime.now(timezone.utc))
        await self.server.write_attribute_value(nodeid, dv)
        self.writes += 1
        return dv.ServerTimestamp

    async def publish_due(self, now: float) -> int:
        """Publish, in order, every change at or before scenario time ``now`` not yet published."""
        n = 0
        for machine, events in self.events.items():
            i, batch = self._next[machine], 0
            while i < len(events) and events[i][0] <= now:
                t, changed = events[i]
                stamp = _utc(self.clock.anchor + t)
                written = []
                for k, (q, v) in enumerate(changed.items()):
                    if k and self.write_spread_s > 0:
                        await asyncio.sleep(self.write_spread_s)
                    written.append(await self._write(machine, q, v, stamp))
                written = [w for w in written if w is not None]
                if self.write_spread_s > 0 and written:
                    self.write_spans[(machine, t)] = (max(written) - min(written)).total_seconds()
                i += 1
                batch += 1
            self._next[machine] = i
            self.max_batch = max(self.max_batch, batch)
            n += batch
        return n

    async def _run(self) -> None:
        while True:
            try:
                down = self._down_at(self.sim_time()) is not None
                if self.serving and down:
                    await self._stop_serving()
                if self.server is None:  # prepared while down (asyncua init takes ~2 s)
                    self.server = await self._prepare()
                if not self.serving and self._down_at(self.sim_time()) is None:
                    await self._serve()
                    log.info("CNC simulator: serving again at t=%.1f s, namespace %s at index %d",
                             self.sim_time(), self.scenario.namespace, self.namespace_index)
                if self.serving:
                    await self.publish_due(self.sim_time())
            except Exception:  # keep serving; a failed write is logged, not fatal
                log.exception("CNC simulator: publishing failed")
            await asyncio.sleep(self.tick_s)

    async def _stop_serving(self) -> None:
        """A cnc_restart fault begins: stop the server (every session is closed); the next one,
        with one more namespace before the scenario's, is prepared while down."""
        assert self.server is not None
        server, self.server, self.serving = self.server, None, False
        self.restart_count += 1
        await server.stop()
        log.info("CNC simulator: server stopped at t=%.1f s (cnc_restart)", self.sim_time())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
            self.serving = False

    async def __aenter__(self) -> CncBank:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
