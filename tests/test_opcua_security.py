"""OPC UA security against the real simulator: Basic256Sha256 Sign and SignAndEncrypt, user name
and password, client certificates made by ``energy-agent certs``, server certificate trust."""

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from energy_agent.app import config
from energy_agent.app.probe import probe
from energy_agent.core.clock import Clock
from energy_agent.core.errors import ConfigError
from energy_agent.drivers import pki as certs
from energy_agent.drivers.opcua import CncDriver
from energy_agent.simulators import scenario as scn
from energy_agent.simulators.cnc import CncBank, ServerSecurity
from energy_agent.simulators.plant import DEMO_CONFIG, DEMO_SCENARIO
from energy_agent.simulators.services import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = scn.load(DEMO_SCENARIO)
PASSWORD = "correct horse battery staple"
SPEED = 5.0  # J-1001 (scenario 160 s to 460 s) runs through the whole module: 58 s real


def _server_cert(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = certs.make_certificate(name, "urn:energy-agent:simulator", [socket.gethostname(), "localhost"],
                                       server=True)
    paths = folder / f"{name}.der", folder / f"{name}.key.pem"
    certs.write(cert, key, *paths)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Server certificate, a rogue server's certificate, the trusted-clients folder (filled by tests)."""
    d = tmp_path_factory.mktemp("pki")
    (d / "trusted-clients").mkdir()
    (d / "rogue").mkdir()
    return {"dir": d, "server": _server_cert(d, "sim"), "rogue": _server_cert(d / "rogue", "rogue")}


@pytest.fixture(scope="module")
async def server(pki):
    clock = Clock(speed=SPEED, anchor=time.time() - 170.0 / SPEED)  # J-1001 runs (scenario 160 s on)
    cert, key = pki["server"]
    sec = ServerSecurity(cert, key, modes=("Sign", "SignAndEncrypt"), users={"agent": PASSWORD},
                         trusted_clients=pki["dir"] / "trusted-clients")
    bank = CncBank(DEMO, clock, port=free_port(), security=sec)
    await bank.start()
    yield bank, clock
    await bank.stop()


def _config(tmp_path: Path, endpoint: str, security: dict) -> config.Loaded:
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg.pop("clock")
    cfg["cncs"][0].update(endpoint=endpoint, security=security)
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return config.load(path)


def _certs_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "energy_agent", "certs", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


async def _run(loaded: config.Loaded, clock: Clock, until, timeout: float = 15.0) -> tuple[CncDriver, list]:
    """Run the driver of cnc-1 until ``until(driver, readings)`` or the timeout; return both."""
    c = loaded.config.cnc("cnc-1")
    readings: list = []
    driver = CncDriver(c.id, c.endpoint, loaded.nodemaps[c.id], loaded.node_ids[c.id], clock, readings.append,
                       interval_s=0.1 * SPEED, timeout_s=2.0, backoff_min_s=0.2, backoff_max_s=0.5,
                       security=loaded.security[c.id])
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not until(driver, readings) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    return driver, readings


def _has_job(driver, readings) -> bool:
    return any(r.ok and r.values.get("job_id") == "J-1001" for r in readings)


def _failed(driver, readings) -> bool:
    return any(not r.ok for r in readings)


async def _client_cert(tmp_path: Path, pki, *, trusted: bool = True) -> None:
    """``energy-agent certs`` for cnc-1 (paths from the config); optionally trusted by the server."""
    out = _certs_cli("-c", str(tmp_path / "plant.yaml"), "--device", "cnc-1")
    assert out.returncode == 0, out.stderr
    if trusted:
        shutil.copy(tmp_path / "pki" / "agent.der", pki["dir"] / "trusted-clients" / f"{tmp_path.name}.der")


def _secure(mode: str, **kw) -> dict:
    return {"policy": "Basic256Sha256", "mode": mode, "certificate": "pki/agent.der",
            "private_key": "pki/agent.key.pem", "username": "agent", **kw}


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_trusted_client_with_password_reads_the_cnc(server, pki, tmp_path, monkeypatch, caplog, mode):
    caplog.set_level(logging.INFO)  # what the agent logs with --log-level DEBUG (asyncua at INFO)
    bank, clock = server
    shutil.copy(pki["server"][0], tmp_path / "server.der")
    monkeypatch.setenv("CNC1_PASSWORD", PASSWORD)
    trust = {"server_certificate": "server.der"} if mode == "Sign" else {"trust_dir": "trusted-servers"}
    if mode == "SignAndEncrypt":
        (tmp_path / "trusted-servers").mkdir()
        shutil.copy(pki["server"][0], tmp_path / "trusted-servers" / "sim.der")
    loaded = _config(tmp_path, bank.endpoint, _secure(mode, password_env="CNC1_PASSWORD", **trust))
    await _client_cert(tmp_path, pki)
    driver, readings = await _run(loaded, clock, _has_job)
    assert _has_job(driver, readings), [r.error for r in readings if not r.ok]
    assert all(r.ok for r in readings)
    assert bank.logins[-1] == "agent" and PASSWORD not in caplog.text


async def test_wrong_password_is_refused(server, pki, tmp_path):
    bank, clock = server
    shutil.copy(pki["server"][0], tmp_path / "server.der")
    (tmp_path / "password").write_text("not the password\n")
    loaded = _config(tmp_path, bank.endpoint, _secure("SignAndEncrypt", password_file="password",
                                                      server_certificate="server.der"))
    await _client_cert(tmp_path, pki)
    driver, readings = await _run(loaded, clock, _failed)
    errors = [r.error for r in readings if not r.ok]
    assert errors and "BadUserAccessDenied" in errors[0]
    assert not any(r.ok for r in readings) and not driver.available
    assert "not the password" not in errors[0]


async def test_unknown_client_certificate_is_refused(server, pki, tmp_path, monkeypatch):
    bank, clock = server
    shutil.copy(pki["server"][0], tmp_path / "server.der")
    monkeypatch.setenv("CNC1_PASSWORD", PASSWORD)
    loaded = _config(tmp_path, bank.endpoint, _secure("Sign", password_env="CNC1_PASSWORD",
                                                      server_certificate="server.der"))
    await _client_cert(tmp_path, pki, trusted=False)
    driver, readings = await _run(loaded, clock, _failed)
    errors = [r.error for r in readings if not r.ok]
    assert errors and "BadCertificateUntrusted" in errors[0]
    assert not any(r.ok for r in readings)


async def test_untrusted_server_is_refused_before_the_password_is_sent(server, pki, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="energy_agent.drivers.opcua")
    bank, clock = server
    (tmp_path / "trusted-servers").mkdir()
    shutil.copy(pki["rogue"][0], tmp_path / "trusted-servers" / "rogue.der")  # trusts another server only
    monkeypatch.setenv("CNC1_PASSWORD", PASSWORD)
    loaded = _config(tmp_path, bank.endpoint, _secure("SignAndEncrypt", password_env="CNC1_PASSWORD",
                                                      trust_dir="trusted-servers"))
    await _client_cert(tmp_path, pki)
    logins = len(bank.logins)
    driver, readings = await _run(loaded, clock, _failed)
    errors = [r.error for r in readings if not r.ok]
    served = certs.thumbprint(certs.load_certificate(pki["server"][0]))
    assert errors and errors[0].startswith("cnc-1: server certificate") and "not trusted" in errors[0]
    assert served in errors[0]  # the operator sees which certificate to check
    assert len(bank.logins) == logins  # no session was attempted, so no password left the agent
    warnings = [r.message for r in caplog.records if "unavailable" in r.message]
    assert len(warnings) == 1 and "not trusted" in warnings[0]


async def test_pinned_certificate_of_another_server_is_refused(server, pki, tmp_path, monkeypatch):
    bank, clock = server
    monkeypatch.setenv("CNC1_PASSWORD", PASSWORD)
    shutil.copy(pki["rogue"][0], tmp_path / "server.der")
    loaded = _config(tmp_path, bank.endpoint, _secure("Sign", password_env="CNC1_PASSWORD",
                                                      server_certificate="server.der"))
    await _client_cert(tmp_path, pki)
    driver, readings = await _run(loaded, clock, _failed)
    errors = [r.error for r in readings if not r.ok]
    assert errors and "not trusted" in errors[0] and "security.server_certificate" in errors[0]


def test_certs_command_refuses_to_overwrite_and_prints_the_thumbprint(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    out = _certs_cli("--uri", "urn:energy-agent:plant:gw", "--cert", str(cert), "--key", str(key), "--dns", "gw-1")
    assert out.returncode == 0, out.stderr
    made = certs.load_certificate(cert)
    assert certs.thumbprint(made) in out.stdout and str(cert) in out.stdout
    assert certs.certificate_uri(made) == "urn:energy-agent:plant:gw"
    assert (key.stat().st_mode & 0o077) == 0  # the key is readable by its owner only
    again = _certs_cli("--uri", "urn:x", "--cert", str(cert), "--key", str(key))
    assert again.returncode == 2 and "already exist" in again.stderr
    assert certs.load_certificate(cert) == made  # untouched
    forced = _certs_cli("--uri", "urn:x", "--cert", str(cert), "--key", str(key), "--force")
    assert forced.returncode == 0 and certs.load_certificate(cert) != made


@pytest.mark.parametrize("security, message", [
    ({"policy": "Basic256Sha256", "mode": "Sign"}, "cncs[0].security.certificate: mode Sign needs a client certificate"),
    ({"mode": "SignAndEncrypt"}, "cncs[0].security.mode: policy None with mode SignAndEncrypt"),
    ({"policy": "Basic256Sha256", "mode": "Sign", "certificate": "a.der", "private_key": "a.pem"},
     "cncs[0].security.server_certificate: mode Sign needs server_certificate or trust_dir"),
    ({"username": "u"}, "cncs[0].security.username: needs password_env or password_file"),
    ({"username": "u", "password": "x"}, "cncs[0].security.password"),
    ({"password_env": "P"}, "cncs[0].security.username: a password needs a username"),
])
def test_security_config_errors_name_the_field(security, message):
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["cncs"][0]["security"] = security
    with pytest.raises(ConfigError) as err:
        config.parse(cfg)
    assert message in str(err.value)


def test_security_paths_are_relative_to_the_config_file(tmp_path):
    loaded = _config(tmp_path, "opc.tcp://127.0.0.1:4840", _secure("Sign", password_file="pw",
                                                                    trust_dir="trusted"))
    sec = loaded.security["cnc-1"]
    assert sec.certificate == tmp_path / "pki" / "agent.der" and sec.trust_dir == tmp_path / "trusted"
    assert sec.password_file == tmp_path / "pw"
    assert loaded.security["cnc-2"].mode == "None"  # the default
    assert "correct horse" not in loaded.config.model_dump_json()


async def test_probe_uses_the_security_of_the_cnc(server, pki, tmp_path, monkeypatch):
    bank, clock = server
    shutil.copy(pki["server"][0], tmp_path / "server.der")
    monkeypatch.setenv("CNC1_PASSWORD", PASSWORD)
    loaded = _config(tmp_path, bank.endpoint, _secure("SignAndEncrypt", password_env="CNC1_PASSWORD",
                                                      server_certificate="server.der"))
    await _client_cert(tmp_path, pki)
    res = await probe(loaded, "cnc-1")
    assert res.ok, (res.error, res.warnings)
    assert {r["point"]: r["value"] for r in res.rows}["(job key)"] == "J-1001"
    shutil.copy(pki["rogue"][0], tmp_path / "server.der")  # now pinned to another server
    res = await probe(loaded, "cnc-1")
    assert res.error and res.error.startswith("cnc-1: server certificate") and "not trusted" in res.error
