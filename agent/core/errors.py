"""The project's exception tree.

::

    AgentError
     ├── ConfigError     bad configuration, profile or node map (raised at start, never at poll time)
     ├── DeviceError     a device could not be reached or answered badly (becomes data quality)
     ├── DeliveryError   MQTT or InfluxDB refused or lost a message
     └── RecordError     a record could not be built, stored or verified
          └── DuplicateRecord  the ledger already holds this record (same job, same start)

Protocol-library exceptions (pymodbus, asyncua, paho, influxdb-client) never leave the module
that calls the library: they are mapped to one of these with ``raise ... from exc``.
"""


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """Configuration, profile or node map is invalid; the message names the field."""


class DeviceError(AgentError):
    """A device is unreachable or sent data that cannot be used."""


class DeliveryError(AgentError):
    """A record could not be delivered to the broker or the store."""


class RecordError(AgentError):
    """A record could not be built, stored or verified."""


class DuplicateRecord(RecordError):
    """The ledger already holds a record with this id: the same job was finished twice."""
