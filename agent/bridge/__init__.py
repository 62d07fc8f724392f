"""The bridge: records from MQTT into InfluxDB (line protocol, v1 or v2 write).

Imports ``energy_agent.core``, ``energy_agent.records`` and ``energy_agent.delivery``."""
