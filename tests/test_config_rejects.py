"""Bad configs, one per line: each is rejected at start, by `check-config` as by `run`, with a
message that names the field (and the device), never with a traceback.

Every case is the demo config (config/demo.yaml) with one thing broken, or a file that is not a
config at all. Cases that need files on disk (certificates, keys, password files) get them in
the test's folder, next to the config, from the module's ``pki`` fixture.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from energy_agent.app import config
from energy_agent.app.cli import main
from energy_agent.core.errors import ConfigError
from energy_agent.drivers import pki as certs

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEXT = (ROOT / "config/demo.yaml").read_text()


def _demo() -> dict:
    return yaml.safe_load(DEMO_TEXT)


# --------------------------------------------------------------------------- files the cases use

def _self_signed(key, *, uri: str | None = "urn:energy-agent:test", days: float = 30, ago: float = 1):
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=ago))
         .not_valid_after(now + dt.timedelta(days=days)))
    if uri:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    return b.sign(key, hashes.SHA256())


def _pem_key(key, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A folder of good and bad certificates and keys (copied next to each case's config)."""
    d = tmp_path_factory.mktemp("pki")
    cert, key = certs.make_certificate("agent", "urn:energy-agent:test", ["localhost"])
    certs.write(cert, key, d / "agent.der", d / "agent.key.pem")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "other.key.pem").write_bytes(_pem_key(other))
    (d / "encrypted.key.pem").write_bytes(_pem_key(other, b"passphrase"))
    (d / "expired.der").write_bytes(_self_signed(other, days=-1, ago=30).public_bytes(serialization.Encoding.DER))
    (d / "no-uri.der").write_bytes(_self_signed(other, uri=None).public_bytes(serialization.Encoding.DER))
    (d / "other.der").write_bytes(_self_signed(other).public_bytes(serialization.Encoding.DER))
    small = ec.generate_private_key(ec.SECP256R1())
    (d / "ec.der").write_bytes(_self_signed(small).public_bytes(serialization.Encoding.DER))
    (d / "ec.key.pem").write_bytes(_pem_key(small))
    (d / "ca.pem").write_bytes(_self_signed(other, uri=None).public_bytes(serialization.Encoding.PEM))
    (d / "client.pem").write_bytes(_self_signed(other, uri=None).public_bytes(serialization.Encoding.PEM))
    (d / "client.key").write_bytes(_pem_key(other))
    (d / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (d / "notes.txt").write_text("not a certificate\n")
    (d / "trusted").mkdir()
    shutil.copy(d / "other.der", d / "trusted" / "server.der")
    (d / "empty-trust").mkdir()
    (d / "junk-trust").mkdir()
    (d / "junk-trust" / "server.der").write_bytes(b"\x30\x03\x02\x01\x01")
    (d / "empty-password").write_text("")
    (d / "latin1-password").write_bytes("pässword\n".encode("latin-1"))
    (d / "latin1-profile.yaml").write_bytes("name: zähler\n".encode("latin-1"))
    return d


def _secure(**kw) -> dict:
    """cnc security that passes every check (files from the pki fixture), with ``kw`` changed."""
    return {"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "certificate": "pki/agent.der",
            "private_key": "pki/agent.key.pem", "server_certificate": "pki/other.der", **kw}


def _set(path: str, value) -> Callable[[dict], None]:
    """A mutation that sets the value at ``a.b[0].c`` (a missing mapping on the way is made)."""
    def mutate(d: dict) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {}) if isinstance(k, str) else node[k]
        node[keys[-1]] = value
    return mutate


def _do(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        for m in mutations:
            m(d)
    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        *head, last = path.split(".")
        node = d
        for k in head:
            node = node[k]
        del node[last]
    return mutate


def _rtu(unit: int, **serial) -> dict:
    return {"id": f"pm-rtu-{unit}-{len(serial)}", "transport": "rtu", "unit_id": unit, "profile": "eastron-sdm630",
            "serial": {"device": "/dev/ttyUSB0", "baudrate": 9600, **serial}}


def _add_meter(meter: dict) -> Callable[[dict], None]:
    return lambda d: d["meters"].append(meter)


def _text(edit: Callable[[str], str]) -> Callable[[Path], bytes]:
    return lambda tmp: edit(DEMO_TEXT).encode()


# --------------------------------------------------------------------------- the cases

MODEL_CASES: list[tuple[str, Callable[[dict], None], str]] = [
    # numbers: strict types, finite, in range
    ("port-true", _set("meters[0].port", True), "meters[0].port: Input should be a valid integer (got true)"),
    ("port-string", _set("meters[0].port", "5020"), "meters[0].port: Input should be a valid integer"),
    ("port-float", _set("meters[0].port", 5020.0), "meters[0].port: Input should be a valid integer"),
    ("port-too-big", _set("meters[1].port", 70000), "meters[1].port: Input should be less than or equal to 65535"),
    ("port-zero", _set("meters[0].port", 0), "meters[0].port: Input should be greater than or equal to 1"),
    ("unit-id-float", _set("meters[0].unit_id", 1.5), "meters[0].unit_id: Input should be a valid integer"),
    ("mqtt-port-true", _set("mqtt.port", True), "mqtt.port: Input should be a valid integer (got true)"),
    ("factor-inf", _set("emission_factors.vn-2023.value", float("inf")),
     "emission_factors.vn-2023.value: Input should be a finite number"),
    ("factor-nan", _set("emission_factors.cn-2023.value", float("nan")),
     "emission_factors.cn-2023.value: Input should be a finite number"),
    ("factor-string", _set("emission_factors.vn-2023.value", "0.6592"),
     "emission_factors.vn-2023.value: Input should be a valid number"),
    ("factor-g-per-kwh", _set("emission_factors.vn-2023.value", 659.2), "is it in g/kWh or kg/MWh?"),
    ("factor-zero", _set("emission_factors.vn-2023.value", 0), "emission_factors.vn-2023.value: Input should be greater than 0"),
    ("factor-year-true", _set("emission_factors.vn-2023.year", True), "emission_factors.vn-2023.year: Input should be a valid integer"),
    ("factor-dates-reversed", _do(_set("emission_factors.vn-2023.valid_from", dt.date(2024, 1, 1)),
                                  _set("emission_factors.vn-2023.valid_to", dt.date(2023, 1, 1))),
     "emission_factors.vn-2023.valid_to: 2023-01-01 is before valid_from 2024-01-01"),
    ("factor-authority-empty", _set("emission_factors.vn-2023.authority", ""),
     "emission_factors.vn-2023.authority: String should have at least 1 character"),
    ("factor-document-too-long", _set("emission_factors.vn-2023.document", "x" * 5000),
     "emission_factors.vn-2023.document: String should have at most 4096 characters (got a text of 5000"),
    ("factor-id-with-space", lambda d: d["emission_factors"].update({"vn 2023": d["emission_factors"]["vn-2023"]}),
     "emission_factors.vn 2023.[key]: String should match pattern"),
    ("max-gap-inf", _set("machines[0].max_gap_s", float("inf")), "machines[0].max_gap_s: Input should be a finite number"),
    ("max-gap-nan", _set("machines[1].max_gap_s", float("nan")), "machines[1].max_gap_s: Input should be a finite number"),
    ("max-gap-a-year", _set("machines[0].max_gap_s", 3.2e7), "machines[0].max_gap_s: Input should be less than or equal to 86400"),
    ("close-timeout-inf", _set("machines[0].close_timeout_s", float("inf")), "machines[0].close_timeout_s: Input should be a finite"),
    ("standby-true", _set("machines[0].standby_below_w", True), "machines[0].standby_below_w: Input should be a valid number"),
    ("off-above-standby", _do(_set("machines[0].standby_below_w", 600), _set("machines[0].off_below_w", 700)),
     "machines[0].off_below_w: 700 W is above standby_below_w 600 W"),
    ("standby-10-gw", _set("machines[0].standby_below_w", 1e10), "machines[0].standby_below_w: Input should be less than or equal to 10000000"),
    ("calibration-date-a-number", _set("meters[0].calibration.valid_until", 0),
     "meters[0].calibration.valid_until: Input should be a date like 2027-03-31, not 0"),
    ("poll-interval-zero", _set("meters[0].poll_interval_s", 0), "meters[0].poll_interval_s: Input should be greater than 0"),
    ("clock-speed-inf", _set("clock.speed", float("inf")), "clock.speed: Input should be a finite number"),
    ("archive-enabled-yes", _set("archive.enabled", "yes"), "archive.enabled: Input should be a valid boolean"),
    ("mqtt-status-1", _set("mqtt.status", 1), "mqtt.status: Input should be a valid boolean"),
    # host names and endpoints
    ("endpoint-no-host", _set("cncs[0].endpoint", "opc.tcp://"), "cncs[0].endpoint: 'opc.tcp://' has no host"),
    ("endpoint-port-99999", _set("cncs[0].endpoint", "opc.tcp://host:99999"), "cncs[0].endpoint: 'opc.tcp://host:99999': port out of range"),
    ("endpoint-port-zero", _set("cncs[0].endpoint", "opc.tcp://host:0"), "port 0 is not a port"),
    ("endpoint-port-text", _set("cncs[1].endpoint", "opc.tcp://host:opc"), "cncs[1].endpoint: 'opc.tcp://host:opc': the port is not a number"),
    ("endpoint-space", _set("cncs[0].endpoint", "opc.tcp://127.0.0.1 :4840"), "cncs[0].endpoint: 'opc.tcp://127.0.0.1 :4840' contains a space"),
    ("endpoint-empty-label", _set("cncs[0].endpoint", "opc.tcp://cnc..plant:4840"), "cncs[0].endpoint: host 'cnc..plant' has an empty label"),
    ("endpoint-http", _set("cncs[0].endpoint", "http://cnc:4840"), "cncs[0].endpoint: String should match pattern"),
    ("endpoint-credentials", _set("cncs[0].endpoint", "opc.tcp://agent:pw@cnc:4840"), "credentials do not belong in the URL"),
    ("endpoint-bad-ipv6", _set("cncs[0].endpoint", "opc.tcp://[::1:4840"), "cncs[0].endpoint:"),
    ("host-space", _set("meters[0].host", "192.0.2 .10"), "meters[0].host: host '192.0.2 .10' contains a space"),
    ("host-empty", _set("meters[0].host", ""), "meters[0].host: empty host name"),
    ("host-empty-label", _set("meters[0].host", "pm..plant.local"), "meters[0].host: host 'pm..plant.local' has an empty label"),
    ("host-too-long", _set("meters[0].host", ".".join(["a" * 60] * 5)), "meters[0].host: host name of 304 characters (at most 253)"),
    ("host-is-url", _set("meters[0].host", "http://x"), "meters[0].host: host 'http://x' is a URL"),
    ("host-with-port", _set("meters[0].host", "192.0.2.10:502"), "a port goes in its own field"),
    ("host-bad-ipv4", _set("meters[0].host", "300.1.1.1"), "meters[0].host: host '300.1.1.1' is not a valid IPv4 address"),
    ("host-long-label", _set("meters[0].host", "a" * 64 + ".local"), "is longer than 63 characters"),
    ("host-leading-hyphen", _set("meters[0].host", "-pm.local"), "label '-pm' may hold only"),
    ("mqtt-host-url", _set("mqtt.host", "mqtt://broker"), "mqtt.host: host 'mqtt://broker' is a URL"),
    ("influx-url-no-host", _set("influx.url", "http://"), "influx.url: 'http://' has no host"),
    ("influx-url-port", _set("influx.url", "http://db:70000"), "influx.url: 'http://db:70000': port out of range"),
    ("influx-subscription", _set("influx.subscription", "energy/#/record"), "influx.subscription: 'energy/#/record': '#' must be a whole level"),
    ("mqtt-topic-prefix", _set("mqtt.topic_prefix", "energy//v1"), "mqtt.topic_prefix: topic_prefix must be a plain topic"),
    ("mqtt-confirm-by", _set("mqtt.confirm_by", ["my bridge"]), "mqtt.confirm_by[0]: String should match pattern"),
    # one device configured twice, one line with two settings
    ("same-meter-twice", _set("meters[1].unit_id", 1),
     "meters[1] (pm-2): the same meter as meters[0] (pm-1): unit 1 at 127.0.0.1:5020"),
    ("same-meter-host-case", _do(_set("meters[0].host", "Gateway.local"), _set("meters[1].host", "gateway.local."),
                                 _set("meters[1].unit_id", 1)), "meters[1] (pm-2): the same meter as meters[0] (pm-1)"),
    ("same-cnc-twice", _set("cncs[1].params", {"namespace": "urn:energy-agent:sim", "channel": "M1.Channel_1",
                                                "job": "M1.Job"}), "cncs[1] (cnc-2): the same CNC as cncs[0] (cnc-1)"),
    ("same-cnc-default-port", _do(_set("cncs[1].endpoint", "opc.tcp://127.0.0.1"),
                                  _set("cncs[1].params", {"namespace": "urn:energy-agent:sim", "channel": "M1.Channel_1",
                                                          "job": "M1.Job"})), "cncs[1] (cnc-2): the same CNC as cncs[0] (cnc-1)"),
    ("serial-two-baudrates", _do(_add_meter(_rtu(3)), _add_meter(_rtu(4, baudrate=19200))),
     "meters[3].serial (pm-rtu-4-1): line /dev/ttyUSB0 is driven at 19200 8N1 here but at 9600 8N1 for meters[2]"),
    ("serial-two-parities", _do(_add_meter(_rtu(3)), _add_meter(_rtu(4, parity="E"))), "is driven at 9600 8E1 here but at 9600 8N1"),
    ("serial-same-unit", _do(_add_meter(_rtu(3)), _add_meter(_rtu(3, stopbits=1))),
     "meters[3] (pm-rtu-3-1): the same meter as meters[2] (pm-rtu-3-0): unit 3 on /dev/ttyUSB0"),
    ("serial-stopbits-true", _add_meter(_rtu(3, stopbits=True)), "meters[2].serial.stopbits: Input should be an integer"),
    ("cnc-param-empty", _set("cncs[0].params.job", ""), "cncs[0].params.job: String should have at least 1 character"),
    ("serial-device-empty", _add_meter(_rtu(3, device="")), "meters[2].serial.device: String should have at least 1 character"),
    ("tcp-and-gateway", _set("meters[1].transport", "rtu-over-tcp"),
     "meters[1].transport (pm-2): 127.0.0.1:5020 is rtu-over-tcp here but tcp for meters[0] (pm-1)"),
    ("rtu-with-host", _add_meter({**_rtu(3), "host": "10.0.0.1"}), "meters[2].host: transport rtu reaches the meter over serial.device"),
    ("rtu-with-port", _add_meter({**_rtu(3), "port": 502}), "meters[2].port: transport rtu has no TCP port"),
    ("rtu-unit-zero", _add_meter(_rtu(0)), "meters[2].unit_id: 0 is the broadcast address"),
    ("tcp-with-serial", _set("meters[0].serial", {"device": "/dev/ttyUSB0"}), "meters[0].serial: transport tcp goes over TCP"),
    # references, ids, unknown keys
    ("unknown-meter", _set("machines[1].meter", "pm-7"), "machines[1].meter: unknown meter 'pm-7' (known: pm-1, pm-2)"),
    ("unknown-top-key", _set("machine", []), "machine: Extra inputs are not permitted"),
    ("site-empty", _set("site", ""), "site: String should match pattern"),
    # ledger and archive paths
    ("ledger-path-empty", _set("ledger.path", ""), "ledger.path: empty path"),
    ("ledger-path-folder-slash", _set("ledger.path", "var/"), "ledger.path: 'var/' names a folder"),
    ("ledger-path-nul", _set("ledger.path", "led\0ger.db"), "ledger.path: a path cannot contain a NUL character"),
    ("ledger-path-too-long", _set("ledger.path", "x" * 5000), "ledger.path: cannot use {tmp}/xxx"),
    ("ledger-path-is-a-folder", _set("ledger.path", "state"), "ledger.path: {tmp}/state is a folder"),
    ("ledger-under-a-file", _set("ledger.path", "notes.txt/ledger.db"), "ledger.path: {tmp}/notes.txt is a file, not a folder"),
    ("archive-path-is-a-file", _set("archive.path", "notes.txt"), "archive.path: {tmp}/notes.txt is a file, not a folder"),
    # credentials, secrets, TLS files
    ("mqtt-credentials-plaintext", _set("mqtt.username", "gw"), "mqtt.username: credentials without a tls section"),
    ("mqtt-password-env-unset", _set("mqtt", {"host": "127.0.0.1", "username": "gw", "password_env": "NO_SUCH_VARIABLE_X1",
                                              "tls": {}}), "mqtt.password_env: environment variable NO_SUCH_VARIABLE_X1 is not set"),
    ("mqtt-password-env-bad-name", _set("mqtt", {"username": "gw", "password_env": "my password", "tls": {}}),
     "mqtt.password_env: String should match pattern"),
    ("mqtt-password-file-missing", _set("mqtt", {"username": "gw", "password_file": "secrets/mqtt", "tls": {}}),
     "mqtt.password_file: cannot read {tmp}/secrets/mqtt: No such file or directory"),
    ("mqtt-password-file-empty", _set("mqtt", {"username": "gw", "password_file": "pki/empty-password", "tls": {}}),
     "mqtt.password_file: {tmp}/pki/empty-password is empty"),
    ("mqtt-password-file-not-utf8", _set("mqtt", {"username": "gw", "password_file": "pki/latin1-password", "tls": {}}),
     "mqtt.password_file: {tmp}/pki/latin1-password is not UTF-8 text"),
    ("mqtt-ca-missing", _set("mqtt.tls", {"ca_file": "pki/nowhere.pem"}), "mqtt.tls.ca_file: cannot read {tmp}/pki/nowhere.pem"),
    ("mqtt-ca-not-pem", _set("mqtt.tls", {"ca_file": "pki/notes.txt"}), "mqtt.tls.ca_file: {tmp}/pki/notes.txt holds no PEM certificate"),
    ("mqtt-cert-missing", _set("mqtt.tls", {"cert_file": "pki/nowhere.pem", "key_file": "pki/client.key"}),
     "mqtt.tls.cert_file: cannot read {tmp}/pki/nowhere.pem"),
    ("mqtt-cert-junk", _set("mqtt.tls", {"cert_file": "pki/junk.pem", "key_file": "pki/client.key"}),
     "mqtt.tls.cert_file: {tmp}/pki/junk.pem is not a PEM certificate"),
    ("mqtt-key-missing", _set("mqtt.tls", {"cert_file": "pki/client.pem", "key_file": "pki/nowhere.key"}),
     "mqtt.tls.key_file: cannot read {tmp}/pki/nowhere.key"),
    ("mqtt-key-encrypted", _set("mqtt.tls", {"cert_file": "pki/client.pem", "key_file": "pki/encrypted.key.pem"}),
     "mqtt.tls.key_file: {tmp}/pki/encrypted.key.pem is encrypted"),
    ("mqtt-key-mismatch", _set("mqtt.tls", {"cert_file": "pki/client.pem", "key_file": "pki/agent.key.pem"}),
     "mqtt.tls.key_file: {tmp}/pki/agent.key.pem is not the key of cert_file"),
    ("mqtt-password-in-yaml", _set("mqtt.password", "hunter2"), "mqtt.password: Extra inputs are not permitted"),
    ("cnc-password-env-unset", _set("cncs[0].security", {"username": "agent", "password_env": "NO_SUCH_VARIABLE_X2"}),
     "cncs[0].security.password_env (cnc-1): environment variable NO_SUCH_VARIABLE_X2 is not set"),
    ("cnc-password-file-missing", _set("cncs[1].security", {"username": "agent", "password_file": "cnc-2.pw"}),
     "cncs[1].security.password_file (cnc-2): cannot read {tmp}/cnc-2.pw"),
    ("cnc-password-file-nul", _set("cncs[1].security", {"username": "agent", "password_file": "a\0b"}),
     "cncs[1].security.password_file: a path cannot contain a NUL character"),
    ("cnc-certificate-missing", _set("cncs[0].security", _secure(certificate="pki/nowhere.der")),
     "cncs[0].security.certificate (cnc-1): cannot read {tmp}/pki/nowhere.der"),
    ("cnc-certificate-junk", _set("cncs[0].security", _secure(certificate="pki/notes.txt")),
     "cncs[0].security.certificate (cnc-1): {tmp}/pki/notes.txt is not a certificate"),
    ("cnc-certificate-expired", _set("cncs[0].security", _secure(certificate="pki/expired.der",
                                                                  private_key="pki/other.key.pem")),
     "cncs[0].security.certificate (cnc-1): {tmp}/pki/expired.der expired on"),
    ("cnc-certificate-no-uri", _set("cncs[0].security", _secure(certificate="pki/no-uri.der",
                                                                 private_key="pki/other.key.pem")),
     "cncs[0].security.certificate (cnc-1): {tmp}/pki/no-uri.der has no application URI"),
    ("cnc-key-missing", _set("cncs[0].security", _secure(private_key="pki/nowhere.pem")),
     "cncs[0].security.private_key (cnc-1): cannot read {tmp}/pki/nowhere.pem"),
    ("cnc-key-mismatch", _set("cncs[0].security", _secure(private_key="pki/other.key.pem")),
     "cncs[0].security.private_key (cnc-1): {tmp}/pki/other.key.pem is not the key of certificate"),
    ("cnc-key-encrypted", _set("cncs[0].security", _secure(private_key="pki/encrypted.key.pem")),
     "cncs[0].security.private_key (cnc-1): {tmp}/pki/encrypted.key.pem: the key is encrypted"),
    ("cnc-key-ec", _set("cncs[0].security", _secure(certificate="pki/ec.der", private_key="pki/ec.key.pem")),
     "Basic256Sha256 needs an RSA key of 2048 to 4096 bits"),
    ("cnc-server-certificate-missing", _set("cncs[0].security", _secure(server_certificate="pki/server.der")),
     "cncs[0].security.server_certificate (cnc-1): cannot read {tmp}/pki/server.der"),
    ("cnc-trust-dir-missing", _set("cncs[0].security", _secure(server_certificate=None, trust_dir="pki/nowhere")),
     "cncs[0].security.trust_dir (cnc-1): cannot read {tmp}/pki/nowhere"),
    ("cnc-trust-dir-empty", _set("cncs[0].security", _secure(server_certificate=None, trust_dir="pki/empty-trust")),
     "cncs[0].security.trust_dir (cnc-1): {tmp}/pki/empty-trust holds no certificate"),
    ("cnc-trust-dir-junk", _set("cncs[0].security", _secure(server_certificate=None, trust_dir="pki/junk-trust")),
     "cncs[0].security.trust_dir (cnc-1): {tmp}/pki/junk-trust/server.der is not a certificate (PEM or DER)"),
    ("cnc-trust-dir-a-file", _set("cncs[0].security", _secure(server_certificate=None, trust_dir="pki/notes.txt")),
     "cncs[0].security.trust_dir (cnc-1): {tmp}/pki/notes.txt is not a folder"),
    ("influx-token-unset", _set("influx", {"api": "v2", "url": "http://db:8086", "org": "o", "bucket": "b",
                                           "token_env": "NO_SUCH_VARIABLE_X3"}),
     "influx.token_env: environment variable NO_SUCH_VARIABLE_X3 is not set"),
    ("profile-not-utf8", _set("meters[0].profile", "pki/latin1-profile.yaml"), "meters[0].profile (pm-1):"),
    # what the file is good for
    ("nothing-to-do", _do(_set("machines", []), _drop("influx")), "this config is good for nothing"),
    ("cnc-mode-without-policy", _set("cncs[0].security", {"mode": "Sign"}), "cncs[0].security.mode: policy None with mode Sign"),
]
"""(name, mutation of the demo config, message fragment; ``{tmp}`` is the config's folder)."""

FILE_CASES: list[tuple[str, Callable[[Path], bytes | Path], str]] = [
    ("not-utf8", lambda tmp: DEMO_TEXT.encode().replace(b"site: demo-plant", b"site: d\xffmo-plant"),
     "not UTF-8 text: byte 0xff at offset"),
    ("binary", lambda tmp: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text: byte 0x89 at offset 0 (line 1)"),
    ("utf-16", lambda tmp: DEMO_TEXT.encode("utf-16"), "not UTF-8 text: byte 0xff at offset 0"),
    ("nul-character", _text(lambda t: t.replace("site: demo-plant", "site: demo\0plant")), "character U+0000 is not allowed in YAML"),
    ("duplicate-top-key", _text(lambda t: t + "site: other-plant\n"), "duplicate key 'site' (first at line"),
    ("duplicate-nested-key", _text(lambda t: t.replace("unit_id: 1,", "unit_id: 1, unit_id: 3,")), "duplicate key 'unit_id'"),
    ("duplicate-machine-key", _text(lambda t: t.replace("emission_factor: vn-2023}", "emission_factor: vn-2023, meter: pm-2}")),
     "duplicate key 'meter'"),
    ("unclosed-bracket", _text(lambda t: t.replace("ledger: {path: ledger.db}", "ledger: {path: ledger.db")), "line 8, column"),
    ("tab-indent", _text(lambda t: t.replace("  vn-2023:", "\tvn-2023:")), "found character '\\t' that cannot start any token"),
    ("impossible-date", _text(lambda t: t.replace("valid_until: 2027-12-31}", "valid_until: 2027-02-30}", 1)),
     "'2027-02-30' cannot be read: day is out of range for month"),
    ("empty-file", lambda tmp: b"", "plant.yaml: the file is empty (no settings)"),
    ("only-a-comment", lambda tmp: b"# nothing yet\n", "plant.yaml: the file is empty (no settings)"),
    ("top-level-list", lambda tmp: b"- site: x\n", "plant.yaml: the top level must be a mapping"),
    ("top-level-text", lambda tmp: b"energy agent config\n", "plant.yaml: the top level must be a mapping (site: ..., machines: ...), not a str"),
    ("two-documents", _text(lambda t: t + "---\nsite: x\n"), "expected a single document in the stream"),
    ("python-tag", _text(lambda t: t.replace("site: demo-plant", "site: !!python/object/apply:os.system [id]")),
     "could not determine a constructor"),
    ("deep-nesting", lambda tmp: b"site: " + b"[" * 20000, "nested too deeply"),
    ("a-folder", lambda tmp: tmp, "cannot read: Is a directory"),
    ("no-such-file", lambda tmp: tmp / "nowhere.yaml", "nowhere.yaml: cannot read: No such file or directory"),
    ("endless-file", lambda tmp: Path("/dev/zero"), "/dev/zero: larger than 16 MiB"),
]
"""(name, bytes of the config file or the path to give, message fragment)."""

RUN_CASES: list[tuple[str, str, Callable[[dict], None], str]] = [
    ("run-without-machines", "run", _set("machines", []),
     "machines: `run` needs at least one machine (this config is for `bridge` only)"),
    ("bridge-without-influx", "bridge", _drop("influx"), "influx: `bridge` needs the mqtt and influx sections"),
    ("bridge-without-mqtt", "bridge", _drop("mqtt"), "mqtt: `bridge` needs the mqtt and influx sections"),
    ("run-mqtt-password-unset", "run", _set("mqtt", {"username": "gw", "password_env": "NO_SUCH_VARIABLE_X4", "tls": {}}),
     "mqtt.password_env: environment variable NO_SUCH_VARIABLE_X4 is not set"),
    ("bridge-ca-missing", "bridge", _set("mqtt.tls", {"ca_file": "pki/nowhere.pem"}), "mqtt.tls.ca_file: cannot read"),
]
"""(name, command, mutation, message fragment): rules of one command."""


def _prepare(tmp: Path, pki: Path) -> None:
    shutil.copytree(pki, tmp / "pki")
    (tmp / "state").mkdir()
    (tmp / "notes.txt").write_text("a file\n")


def _write(tmp: Path, data: dict) -> Path:
    path = tmp / "plant.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def _rejected(tmp: Path, path: Path, command: str = "check-config") -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path).check_start(command)  # type: ignore[arg-type]
    return str(info.value)


@pytest.mark.parametrize("name, mutate, fragment", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_config_is_rejected_naming_the_field(tmp_path, pki, name, mutate, fragment):
    _prepare(tmp_path, pki)
    data = _demo()
    mutate(data)
    fragment = fragment.format(tmp=tmp_path)
    # the same message from the data (parse) and from the file (load), both followed by the start checks
    with pytest.raises(ConfigError) as info:
        config.parse(data, tmp_path).check_start("check-config")
    assert fragment in str(info.value)
    assert fragment in _rejected(tmp_path, _write(tmp_path, data))


@pytest.mark.parametrize("name, content, fragment", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_that_is_not_a_config_is_rejected_without_traceback(tmp_path, name, content, fragment):
    made = content(tmp_path)
    path = made if isinstance(made, Path) else tmp_path / "plant.yaml"
    if not isinstance(made, Path):
        path.write_bytes(made)
    assert fragment in _rejected(tmp_path, path)


@pytest.mark.parametrize("name, command, mutate, fragment", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_command_rules(tmp_path, pki, name, command, mutate, fragment):
    _prepare(tmp_path, pki)
    data = _demo()
    mutate(data)
    assert fragment in _rejected(tmp_path, _write(tmp_path, data), command)


def test_there_are_enough_cases():
    assert len(MODEL_CASES) + len(FILE_CASES) + len(RUN_CASES) >= 60


def test_a_secret_put_in_the_yaml_is_not_echoed(tmp_path, pki):
    _prepare(tmp_path, pki)
    data = _demo()
    data["mqtt"]["password"] = "hunter2"
    data["cncs"][0]["security"] = {"username": "agent", "password_env": 12345}
    message = _rejected(tmp_path, _write(tmp_path, data))
    assert "mqtt.password: Extra inputs are not permitted" in message and "hunter2" not in message
    assert "cncs[0].security.password_env: Input should be a valid string" in message and "12345" not in message


def test_every_problem_is_named_at_once(tmp_path, pki):
    _prepare(tmp_path, pki)
    data = _demo()
    data["mqtt"] = {"username": "gw", "password_env": "NO_SUCH_VARIABLE_X5", "tls": {"ca_file": "pki/nowhere.pem"}}
    data["cncs"][1]["security"] = {"username": "agent", "password_env": "NO_SUCH_VARIABLE_X6"}
    message = _rejected(tmp_path, _write(tmp_path, data))
    assert "mqtt.tls.ca_file" in message and "NO_SUCH_VARIABLE_X5" in message and "NO_SUCH_VARIABLE_X6" in message


# --------------------------------------------------------------------------- through the command line

CLI_SAMPLE = [c for c in MODEL_CASES[::6]] + [c for c in MODEL_CASES if c[0] in (
    "mqtt-password-env-unset", "cnc-certificate-missing", "mqtt-ca-not-pem", "off-above-standby", "same-cnc-twice")]


@pytest.mark.parametrize("name, mutate, fragment", CLI_SAMPLE, ids=[c[0] for c in CLI_SAMPLE])
def test_check_config_exits_2_with_the_message(tmp_path, pki, capsys, name, mutate, fragment):
    _prepare(tmp_path, pki)
    data = _demo()
    mutate(data)
    path = _write(tmp_path, data)
    assert main(["check-config", "-c", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("energy-agent: configuration error: ")
    assert fragment.format(tmp=tmp_path) in out.err


@pytest.mark.parametrize("name, content, fragment", FILE_CASES[::3], ids=[c[0] for c in FILE_CASES[::3]])
def test_check_config_on_files_that_are_not_configs(tmp_path, capsys, name, content, fragment):
    made = content(tmp_path)
    path = made if isinstance(made, Path) else tmp_path / "plant.yaml"
    if not isinstance(made, Path):
        path.write_bytes(made)
    assert main(["check-config", "-c", str(path)]) == 2
    assert fragment in capsys.readouterr().err


def test_the_installed_command_prints_no_traceback(tmp_path):
    cases = {"binary.yaml": b"\x89PNG\r\n\x1a\n\x00", "dup.yaml": (DEMO_TEXT + "site: x\n").encode(),
             "port.yaml": DEMO_TEXT.replace("port: 5020, unit_id: 1", "port: true, unit_id: 1").encode()}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        for command in ("check-config", "run", "bridge"):
            out = subprocess.run([sys.executable, "-m", "energy_agent", command, "-c", str(tmp_path / name)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 2, (name, command, out.stderr)
            assert "Traceback" not in out.stderr and "configuration error" in out.stderr, out.stderr


def test_run_refuses_a_config_without_machines_before_starting(tmp_path):
    data = _demo()
    data["machines"] = []
    data["ledger"] = {"path": str(tmp_path / "ledger.db")}
    path = _write(tmp_path, data)
    out = subprocess.run([sys.executable, "-m", "energy_agent", "run", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "machines: `run` needs at least one machine" in out.stderr, out.stderr
    assert not (tmp_path / "ledger.db").exists()  # refused before anything was opened
