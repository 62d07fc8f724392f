"""Shop-floor energy metering agent: per-job energy and CO2e records from meters and CNCs."""

__version__ = "0.1.0"
