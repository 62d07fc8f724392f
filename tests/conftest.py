"""Real services for the tests, started once per session on free loopback ports.

A missing service binary fails the tests that need it (never a skip): `make test` installs
them from Debian packages.
"""

import pytest

from simulators.services import InfluxDB1, Mosquitto, VictoriaMetrics


def _service(cls, tmp_path_factory):
    svc = cls()
    svc.start(tmp_path_factory.mktemp(cls.name))
    return svc


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    svc = _service(Mosquitto, tmp_path_factory)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory):
    svc = _service(InfluxDB1, tmp_path_factory)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def victoria(tmp_path_factory):
    svc = _service(VictoriaMetrics, tmp_path_factory)
    yield svc
    svc.stop()
