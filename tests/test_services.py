"""The local services: each starts, answers on loopback only, restarts on the same port with its
data kept, and leaves no process behind when stopped. Each test runs its own instance (they
start in well under a second), so the session fixtures stay untouched."""

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from energy_agent.delivery.mqtt import MqttClient
from energy_agent.simulators.services import (
    InfluxDB1,
    Mosquitto,
    ServiceError,
    VictoriaMetrics,
    free_port,
    pid_alive,
    require,
)


def listening(pid: int) -> set[tuple[str, str, int]]:
    """(proto, address, port) of every listening TCP / bound UDP socket of a process, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if inode not in inodes or (proto.startswith("tcp") and state != "0A"):  # 0A = LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            if len(addr_hex) == 8:
                addr = ".".join(str(b) for b in reversed(bytes.fromhex(addr_hex)))
            else:
                addr = "::1" if addr_hex == "0" * 24 + "01000000" else addr_hex
            found.add((proto, addr, int(port_hex, 16)))
    return found


def assert_gone(pid: int) -> None:
    assert not pid_alive(pid), f"process {pid} still exists"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_require_names_the_debian_package(monkeypatch):
    from energy_agent.simulators import services

    for binary in ("mosquitto", "influxd", "victoria-metrics"):
        assert os.access(require(binary), os.X_OK)
    monkeypatch.setitem(services.PACKAGES, "influxd-not-here", "influxdb")
    with pytest.raises(ServiceError, match=r"influxd-not-here not found.*apt-get install -y influxdb"):
        require("influxd-not-here")


def test_a_service_that_dies_on_start_says_why(tmp_path):
    broker = Mosquitto(extra="no_such_option 1\n")
    with pytest.raises(ServiceError) as err:
        broker.start(tmp_path)
    assert "exited" in str(err.value) and "no_such_option" in str(err.value)
    assert not broker.running


async def test_mosquitto_restart_keeps_sessions_and_retained_messages(tmp_path):
    broker = Mosquitto().start(tmp_path)
    assert broker.started_in < 5
    pid, port = broker.pid, broker.port
    try:
        assert listening(pid) == {("tcp", "127.0.0.1", port)}
        # A persistent session subscribes, then goes away; messages queue for it.
        keeper = MqttClient(host="127.0.0.1", port=port, client_id="keeper")
        await keeper.connect(5)
        await keeper.subscribe("keep/#", qos=1)
        await keeper.close()
        pub = MqttClient(host="127.0.0.1", port=port, client_id="pub", clean_start=True)
        await pub.connect(5)
        for i in range(3):
            await pub.publish(f"keep/{i}", f"m{i}".encode())
        await pub.publish("state/retained", b"kept", retain=True)
        await pub.close()

        broker.restart()
        assert broker.port == port and broker.pid != pid
        assert_gone(pid)

        keeper = MqttClient(host="127.0.0.1", port=port, client_id="keeper")
        await keeper.connect(5)
        assert keeper.session_present
        got = [await keeper.next_message(5) for _ in range(3)]
        assert sorted(m.payload for m in got if m) == [b"m0", b"m1", b"m2"]
        await keeper.close()
        fresh = MqttClient(host="127.0.0.1", port=port, client_id="fresh", clean_start=True)
        await fresh.connect(5)
        await fresh.subscribe("state/#")
        m = await fresh.next_message(5)
        assert m is not None and (m.payload, m.retain) == (b"kept", True)
        await fresh.close()
    finally:
        pid = broker.pid
        broker.stop()
    assert_gone(pid)
    assert "mosquitto version" in (tmp_path / "mosquitto.log").read_text()


def test_influxdb_restart_keeps_data(tmp_path):
    db = InfluxDB1().start(tmp_path)
    assert db.started_in < 10
    pid = db.pid
    try:
        assert listening(pid) == {("tcp", "127.0.0.1", db.port), ("tcp", "127.0.0.1", db.rpc_port)}
        db.create_database("keep")
        db.write("m,site=a v=1.5,n=2i 1790000000000000001", "keep")
        assert db.query("SELECT * FROM m", "keep") == [{"time": 1790000000000000001, "n": 2, "site": "a", "v": 1.5}]
        port = db.port
        db.restart()
        assert db.port == port and db.pid != pid
        assert_gone(pid)
        assert db.query("SELECT * FROM m", "keep") == [{"time": 1790000000000000001, "n": 2, "site": "a", "v": 1.5}]
        assert {"name": "keep"} in db.query("SHOW DATABASES")
        with pytest.raises(ServiceError, match="database not found"):
            db.query("SELECT * FROM m", "missing")
    finally:
        pid = db.pid
        db.stop()
    assert_gone(pid)


def test_victoriametrics_restart_keeps_data_and_dedups(tmp_path):
    vm = VictoriaMetrics().start(tmp_path / "dedup")
    plain = VictoriaMetrics(dedup=False).start(tmp_path / "plain")
    pids = [vm.pid, plain.pid]
    try:
        for svc in (vm, plain):
            assert listening(svc.pid) == {("tcp", "127.0.0.1", svc.port)}
            for _ in range(2):  # the same sample twice, as a replayed record would be
                req = urllib.request.Request(f"{svc.url}/write?db=x", data=b"m,site=a v=1.5 1790000000123000000",
                                             method="POST")
                assert urllib.request.urlopen(req).status == 204
            svc.force_flush()
        [series] = vm.export()
        assert series["metric"] == {"__name__": "m_v", "db": "x", "site": "a"}
        assert (series["values"], series["timestamps"]) == ([1.5], [1790000000123])
        # Without -dedup.minScrapeInterval VictoriaMetrics keeps both copies.
        assert plain.export()[0]["values"] == [1.5, 1.5]
        port, pid = vm.port, vm.pid
        vm.restart()
        assert vm.port == port and vm.pid != pid
        assert_gone(pid)
        assert vm.export() == [series]
    finally:
        for svc in (vm, plain):
            svc.stop()
    for pid in pids:
        assert_gone(pid)


def test_stop_kills_what_ignores_sigterm(tmp_path):
    broker = Mosquitto().start(tmp_path)
    pid = broker.pid
    os.kill(pid, signal.SIGSTOP)  # a stopped process does not act on SIGTERM
    try:
        t0 = time.monotonic()
        broker.stop(timeout=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
            broker.stop()
    assert_gone(pid)
    broker.start(tmp_path)  # and it comes back after a crash, same port
    try:
        assert broker.pid != pid
    finally:
        pid = broker.pid
        broker.stop()
    assert_gone(pid)


def test_start_on_a_taken_port_fails_clearly(tmp_path):
    import socket

    broker = Mosquitto()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            broker.port = s.getsockname()[1]  # as if restarting onto a port someone took meanwhile
            with pytest.raises(ServiceError, match="(?i)address already in use"):
                broker.start(tmp_path)
        assert not broker.running
    finally:
        broker.stop()


def test_session_fixtures_answer(mosquitto, influxdb, victoria):
    import socket

    socket.create_connection(("127.0.0.1", mosquitto.port), timeout=2).close()
    assert urllib.request.urlopen(f"{influxdb.url}/ping").status == 204
    assert urllib.request.urlopen(f"{victoria.url}/health").status == 200
    for svc in (mosquitto, influxdb, victoria):
        assert all(addr == "127.0.0.1" for _, addr, _ in listening(svc.pid)), listening(svc.pid)
    assert free_port() not in {mosquitto.port, influxdb.port, victoria.port}
    json.dumps([repr(s) for s in (mosquitto, influxdb, victoria)])


class DebianLikeMosquitto(Mosquitto):
    """Debian's main mosquitto.conf, with deploy/mosquitto.conf dropped into conf.d/ (on our port)."""

    def _configure(self) -> list[str]:
        import getpass

        d = self.workdir
        (d / "conf.d").mkdir(exist_ok=True)
        drop_in = (Path(__file__).parent.parent / "deploy" / "mosquitto.conf").read_text()
        assert "listener 1883 127.0.0.1\n" in drop_in
        (d / "conf.d" / "energy-agent.conf").write_text(
            drop_in.replace("listener 1883 127.0.0.1\n", f"listener {self.port} 127.0.0.1\n"))
        conf = d / "mosquitto.conf"
        conf.write_text(f"user {getpass.getuser()}\npersistence true\npersistence_location {d}/\n"
                        f"log_dest file {d}/mosquitto.log\ninclude_dir {d}/conf.d\n")
        return ["-c", str(conf)]


async def test_the_deploy_example_config_runs(tmp_path):
    with DebianLikeMosquitto().start(tmp_path) as broker:
        assert listening(broker.pid) == {("tcp", "127.0.0.1", broker.port)}
        c = MqttClient(host="127.0.0.1", port=broker.port, client_id="deploy-check", clean_start=True)
        await c.connect(5)
        await c.publish("energy/v1/s/a/m/record", b"{}")
        await c.close()
