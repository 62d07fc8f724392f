"""Real services for the tests, started once per session on free loopback ports.

A missing service binary makes the tests that need it fail (never skip), with the Debian
package to install in the message. Test modules add their own fixtures next to their tests.
"""

import pytest

from energy_agent.simulators.services import InfluxDB1, Mosquitto, VictoriaMetrics


def _serve(cls, tmp_path_factory):
    svc = cls()
    svc.start(tmp_path_factory.mktemp(cls.name))  # ServiceError (a failure, not a skip) if it cannot
    return svc


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    svc = _serve(Mosquitto, tmp_path_factory)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory):
    svc = _serve(InfluxDB1, tmp_path_factory)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def victoria(tmp_path_factory):
    svc = _serve(VictoriaMetrics, tmp_path_factory)
    yield svc
    svc.stop()
