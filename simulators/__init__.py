"""Simulated meters (Modbus) and CNC controllers (OPC UA) on one scenario clock, with exact
closed-form ground-truth energy per job and fault injection.

``energy_agent.simulators.scenario`` (model, timelines, ``truth``), ``energy_agent.simulators.meter.MeterBank``,
``energy_agent.simulators.cnc.CncBank``, ``energy_agent.simulators.serve`` (``serve()`` and ``energy-agent simulate``).
See simulators/README.md.
"""
