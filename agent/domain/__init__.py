"""The domain: job and state tracking, energy by state (numba kernels). No I/O.

Imports only ``energy_agent.core``."""
