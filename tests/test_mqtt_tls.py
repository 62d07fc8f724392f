"""MQTT over TLS with a password, against a Mosquitto that has only a TLS listener.

The CA, the broker's certificate and a client certificate are made here with `cryptography`;
the password comes from an environment variable named in the config, never from the YAML.
"""

import datetime as dt
import ipaddress
import logging
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from energy_agent.app import config
from energy_agent.core.errors import ConfigError, DeliveryError
from energy_agent.delivery.mqtt import MqttClient, client_from_config
from energy_agent.simulators.services import Mosquitto, require

PASSWORD = "s3cret-plant-pw"


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, ip: str | None = None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "energy-agent test CA")])
    ca = _cert("energy-agent test CA", ca_key, ca_name, ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("127.0.0.1", srv_key, ca_name, ca_key, ip="127.0.0.1")
    files = {"ca": _write(d / "ca.pem", cert=ca), "cert": _write(d / "server.pem", cert=srv),
             "key": _write(d / "server.key", key=srv_key)}
    passwd = d / "passwd"
    subprocess.run([require("mosquitto_passwd"), "-c", "-b", str(passwd), "gw-line-3", PASSWORD], check=True,
                   capture_output=True)
    broker = Mosquitto(extra=(f"cafile {files['ca']}\ncertfile {files['cert']}\nkeyfile {files['key']}\n"
                              f"tls_version tlsv1.2\nallow_anonymous false\npassword_file {passwd}\n"), tls=True)
    broker.start(d / "broker")
    yield broker, files
    broker.stop()


def _cfg(tmp_path, port, **mqtt):
    data = {"site": "s", "agent_id": "gw", "emission_factors": {}, "machines": [],
            "mqtt": {"host": "127.0.0.1", "port": port, **mqtt}}
    return config.parse(data, tmp_path).config.mqtt


async def test_tls_with_password_from_the_environment(tmp_path, tls_broker, monkeypatch, caplog):
    broker, files = tls_broker
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PLANT_MQTT_PASSWORD", PASSWORD)
    cfg = _cfg(tmp_path, broker.port, username="gw-line-3", password_env="PLANT_MQTT_PASSWORD",
               tls={"ca_file": str(files["ca"])})
    pub = client_from_config(cfg, tmp_path, client_id="tls-pub")
    sub = client_from_config(cfg, tmp_path, client_id="tls-sub", clean_start=True)
    try:
        await sub.connect(5)
        await sub.subscribe("energy/v1/#")
        await pub.connect(5)
        await pub.publish("energy/v1/s/gw/m1/record", b'{"ok": 1}')
        msg = await sub.next_message(timeout=5)
        assert msg is not None and msg.payload == b'{"ok": 1}'
    finally:
        await pub.close()
        await sub.close()
    assert PASSWORD not in caplog.text  # secrets never logged


async def test_plaintext_and_wrong_password_are_refused(tmp_path, tls_broker, monkeypatch):
    broker, files = tls_broker
    plain = MqttClient(host="127.0.0.1", port=broker.port, client_id="plain", username="gw-line-3",
                       password=PASSWORD)
    with pytest.raises(DeliveryError):
        await plain.connect(2)  # the listener speaks TLS only
    await plain.close()
    monkeypatch.setenv("PLANT_MQTT_PASSWORD", "wrong")
    cfg = _cfg(tmp_path, broker.port, username="gw-line-3", password_env="PLANT_MQTT_PASSWORD",
               tls={"ca_file": str(files["ca"])})
    bad = client_from_config(cfg, tmp_path, client_id="bad-pw")
    with pytest.raises(DeliveryError) as info:
        await bad.connect(3)
    await bad.close()
    assert "wrong" not in str(info.value)


async def test_unknown_ca_is_refused(tmp_path, tls_broker):
    broker, _ = tls_broker
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("someone else", other_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]), other_key,
                  ca=True)
    ca = _write(tmp_path / "other-ca.pem", cert=other)
    cfg = _cfg(tmp_path, broker.port, tls={"ca_file": str(ca)})
    c = client_from_config(cfg, tmp_path, client_id="wrong-ca")
    with pytest.raises(DeliveryError):
        await c.connect(2)
    await c.close()


def test_secret_errors_name_the_field(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    cfg = _cfg(tmp_path, 8883, username="u", password_env="NOT_SET_ANYWHERE", tls={})  # tls: credentials need it
    with pytest.raises(ConfigError, match="mqtt.password_env: environment variable NOT_SET_ANYWHERE is not set"):
        cfg.password(tmp_path)
    (tmp_path / "pw").write_text("from-a-file\n")
    assert _cfg(tmp_path, 8883, username="u", password_file="pw", tls={}).password(tmp_path) == "from-a-file"
    with pytest.raises(ConfigError, match="mqtt: a password needs a username"):
        _cfg(tmp_path, 8883, password_env="X")
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        _cfg(tmp_path, 8883, tls={"cert_file": "c.pem"})


async def test_acl_confines_an_agent_to_its_own_prefix(tmp_path):
    # The per-agent ACL documented in deploy/mosquitto.conf, enforced by a real broker.
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    subprocess.run([require("mosquitto_passwd"), "-c", "-b", str(passwd), "gw-1", PASSWORD], check=True,
                   capture_output=True)
    conf = (Path(__file__).resolve().parents[1] / "deploy" / "mosquitto.conf").read_text()
    block = conf.split("#   /etc/mosquitto/acl")[1].split("\n", 1)[1].split("#     user energy-bridge")[0]
    subprocess.run([require("mosquitto_passwd"), "-b", str(passwd), "watcher", PASSWORD], check=True,
                   capture_output=True)
    # The documented lines, as is, and a watcher that sees what the broker lets through.
    acl.write_text("".join(line[6:] + "\n" for line in block.splitlines()) + "user watcher\ntopic read #\n")
    broker = Mosquitto(extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    broker.start(tmp_path / "broker")
    c = MqttClient(host="127.0.0.1", port=broker.port, client_id="gw-1", username="gw-1", password=PASSWORD)
    watcher = MqttClient(host="127.0.0.1", port=broker.port, client_id="watcher", username="watcher",
                         password=PASSWORD, clean_start=True)
    try:
        await watcher.connect(5)
        await watcher.subscribe("energy/#")
        await c.connect(5)
        await c.publish("energy/v1/plant-a/gw-1/m1/record", b"{}")  # its own prefix: accepted
        await c.publish("energy/v1/plant-a/gw-1/status", b"{}", retain=True)
        await c.publish("energy/v1/plant-a/gw-1/device/pm-1/availability", b"{}", retain=True)
        await c.subscribe("energy/v1/plant-a/gw-1/confirm")
        # Only bridges confirm, and another agent's prefix is not ours. Mosquitto answers a
        # denied publish with a failing PUBACK or, now and then, drops the connection: either
        # way it is not acknowledged, and the broker's log says it denied it.
        for denied in ("energy/v1/plant-a/gw-1/confirm", "energy/v1/plant-a/gw-2/m1/record"):
            await c.wait_connected(15)
            with pytest.raises(DeliveryError, match="refused|[Nn]ot authori[sz]ed|connection lost"):
                await c.publish(denied, b"{}", timeout=5)
        for _ in range(5):  # a marker: everything before it has reached the watcher (retried: the
            await c.wait_connected(15)  # broker may drop the connection after a denied publish)
            try:
                await c.publish("energy/v1/plant-a/gw-1/m2/record", b"{}")
                break
            except DeliveryError:
                continue
        seen = set()
        while (m := await watcher.next_message(timeout=5)) is not None:
            seen.add(m.topic)
            if m.topic.endswith("/m2/record"):
                break
        assert seen == {"energy/v1/plant-a/gw-1/m1/record", "energy/v1/plant-a/gw-1/status",
                        "energy/v1/plant-a/gw-1/device/pm-1/availability", "energy/v1/plant-a/gw-1/m2/record"}
    finally:
        await watcher.close()
        await c.close()
        broker.stop()
