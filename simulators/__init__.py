"""Simulated meters and CNC controllers with exact ground-truth energy."""
