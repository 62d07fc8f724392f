"""Records as evidence: building, canonical JSON, hash chains, the SQLite ledger, the
raw-sample archive and replay.

Imports ``energy_agent.core`` and ``energy_agent.domain``."""
