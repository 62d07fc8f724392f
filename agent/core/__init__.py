"""The core: errors, the two clocks, operating states and their rules, readings and records.

Imports nothing of energy_agent's; every other package may import it."""
