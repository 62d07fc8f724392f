"""Delivery: the MQTT client, the outbox drain and the retained status topics.

Imports ``energy_agent.core`` and ``energy_agent.records``."""
