"""The record sections of the configuration: emission factors, the ledger, the archive."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from energy_agent.core.record import Factor
from energy_agent.core.validation import Model


class EmissionFactor(Model):
    """A declared grid emission factor, with everything a verifier asks about it."""

    value: float = Field(gt=0, description="kg CO2e per kWh")
    unit: Literal["kgCO2e/kWh"] = "kgCO2e/kWh"
    authority: str = Field(description="who publishes it, e.g. 'Vietnam MONRE, Department of Climate Change'")
    document: str = Field(description="the publication, e.g. a letter or notice number")
    region: str = Field(description="grid region, e.g. 'VN' or 'CN'")
    year: int = Field(ge=1990, le=2100, description="data year of the factor")
    method: str = Field("", description="e.g. 'CDM grid tool, combined margin'")
    basis: Literal["location", "market"] = Field(description="GHG Protocol Scope 2 basis")
    valid_from: date | None = None
    valid_to: date | None = None

    @model_validator(mode="after")
    def _dates(self) -> "EmissionFactor":
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise ValueError("valid_to is before valid_from")
        return self

    def as_factor(self, factor_id: str) -> Factor:
        """This factor as records carry it, under its id in ``emission_factors``."""
        return Factor(id=factor_id, value=self.value, unit=self.unit, authority=self.authority,
                      document=self.document, region=self.region, year=self.year, method=self.method,
                      basis=self.basis, valid_from=self.valid_from.isoformat() if self.valid_from else None,
                      valid_to=self.valid_to.isoformat() if self.valid_to else None)


class LedgerConfig(Model):
    path: Path = Path("var/ledger.db")
    checkpoint_s: float = Field(5.0, gt=0, le=3600, description=(
        "real seconds between checkpoints of open jobs (job, states, samples): after a crash or a "
        "restart the agent resumes them and loses at most this much of their samples"))
    retention_days: float | None = Field(None, gt=0, description=(
        "prune delivered records older than this many days (none: keep everything); chain heads "
        "stay verifiable through per-machine anchors"))
    hold_max: int = Field(10000, ge=1, description=(
        "finished jobs held in memory while the ledger refuses writes; beyond it the agent stops "
        "with an error rather than lose more"))


class ArchiveConfig(Model):
    """The raw-sample archive: every job's kernel inputs, so ``energy-agent replay`` can
    recompute its record (docs/ARCHIVE.md)."""

    enabled: bool = Field(True, description="append each recorded job's samples to the archive")
    path: Path | None = Field(None, description=(
        "archive folder, one file per machine and UTC day (default: 'archive' beside the ledger)"))

    def folder(self, ledger_path: Path, base: Path) -> Path:
        """The archive folder: ``path`` (relative to the config's folder), else beside the ledger."""
        if self.path is None:
            ledger = ledger_path if ledger_path.is_absolute() else base / ledger_path
            return ledger.parent / "archive"
        return self.path if self.path.is_absolute() else base / self.path
