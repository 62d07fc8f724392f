"""Log lines: UTC ISO 8601 stamps, JSON lines, and the protocol libraries' connection chatter
demoted (the agent logs each outage once) while their real errors stay."""

import json
import logging
import subprocess
import sys

import pytest

from energy_agent.app import logs


@pytest.fixture
def captured(capsys):
    def run(level: str, fmt: str, emit) -> list[str]:
        logs.setup(level, fmt)
        emit()
        for h in logging.getLogger().handlers:
            h.flush()
        return [line for line in capsys.readouterr().err.splitlines() if line]
    yield run
    logs.setup("WARNING")


def _chatter():
    try:
        raise ConnectionError("Connection is closed")
    except ConnectionError:
        logging.getLogger("asyncua.client.ua_session.UaSession").exception("Publish iteration crashed; retrying in 1s")
    logging.getLogger("pymodbus.logging").warning("Failed to connect [Errno 111] Connection refused")
    try:
        raise ValueError("a node id the library cannot parse")
    except ValueError:
        logging.getLogger("asyncua.client").exception("real trouble")
    logging.getLogger("energy_agent.drivers.opcua").warning("cnc-1: unavailable (ConnectionError: Connection is closed)")


def test_library_connection_chatter_is_demoted_and_real_errors_stay(captured):
    lines = captured("INFO", "text", _chatter)
    text = "\n".join(lines)
    assert "Publish iteration crashed" not in text and "Failed to connect" not in text
    assert "real trouble" in text and "ValueError: a node id" in text  # a real error, with its traceback
    assert "cnc-1: unavailable" in text  # the agent's own line for the outage
    assert lines[0][:4].isdigit() and lines[0][10] == "T" and lines[0].split()[0].endswith("Z")


def test_at_debug_the_chatter_is_shown_as_debug_without_traceback(captured):
    lines = captured("DEBUG", "text", _chatter)
    crashed = [x for x in lines if "Publish iteration crashed" in x]
    assert len(crashed) == 1 and " DEBUG " in crashed[0]
    assert sum(x.startswith("Traceback") for x in lines) == 1  # only the real error keeps its traceback


def test_json_lines(captured):
    lines = captured("INFO", "json", _chatter)
    objs = [json.loads(x) for x in lines if x.startswith("{")]
    assert {o["logger"] for o in objs} == {"asyncua.client", "energy_agent.drivers.opcua"}
    real = next(o for o in objs if o["msg"] == "real trouble")
    assert real["level"] == "ERROR" and "ValueError" in real["exc"] and real["ts"].endswith("Z")


def test_log_format_is_a_global_option_of_the_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "energy_agent", "check-config", "-c", str(tmp_path / "none.yaml"),
                          "--log-format", "json", "--log-level", "INFO"], capture_output=True, text=True)
    assert out.returncode == 2 and "configuration error" in out.stderr
