"""Simulated meters (Modbus) and CNC controllers (OPC UA) on one scenario clock, with exact
closed-form ground-truth energy per job and fault injection.

``simulators.scenario`` (model, timelines, ``truth``), ``simulators.meter.MeterBank``,
``simulators.cnc.CncBank``, ``simulators.serve`` (``serve()`` and ``energy-agent simulate``).
See simulators/README.md.
"""
