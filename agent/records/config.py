"""The record sections of the configuration: emission factors, the ledger, the archive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from energy_agent.core.record import Factor
from energy_agent.core.validation import Bool, Date, FilePath, Float, Int, Model, Name, Text

MAX_FACTOR = 2.0
"""kg CO2e per kWh no electricity grid or supply contract reaches (coal-heavy grids are near
1.0-1.3): a larger value is a unit mistake (g/kWh, kg/MWh)."""


class EmissionFactor(Model):
    """A declared grid emission factor, with everything a verifier asks about it."""

    value: Float = Field(gt=0, description="kg CO2e per kWh")
    unit: Literal["kgCO2e/kWh"] = "kgCO2e/kWh"
    authority: Name = Field(description="who publishes it, e.g. 'Vietnam MONRE, Department of Climate Change'")
    document: Name = Field(description="the publication, e.g. a letter or notice number")
    region: Name = Field(description="grid region, e.g. 'VN' or 'CN'")
    year: Int = Field(ge=1990, le=2100, description="data year of the factor")
    method: Text = Field("", description="e.g. 'CDM grid tool, combined margin'")
    basis: Literal["location", "market"] = Field(description="GHG Protocol Scope 2 basis")
    valid_from: Date | None = None
    valid_to: Date | None = Field(None, description=("last day of validity; records of jobs that start after "
                                                     "it carry the flag factor_outside_validity"))

    @field_validator("value")
    @classmethod
    def _plausible(cls, v: float) -> float:
        if v > MAX_FACTOR:
            raise ValueError(f"{v} kgCO2e/kWh is more than any grid emits (at most {MAX_FACTOR}): "
                             "is it in g/kWh or kg/MWh? (divide by 1000)")
        return v

    @model_validator(mode="after")
    def _dates(self) -> EmissionFactor:
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise ValueError(f"valid_to: {self.valid_to} is before valid_from {self.valid_from}")
        return self

    def as_factor(self, factor_id: str) -> Factor:
        """This factor as records carry it, under its id in ``emission_factors``."""
        return Factor(id=factor_id, value=self.value, unit=self.unit, authority=self.authority,
                      document=self.document, region=self.region, year=self.year, method=self.method,
                      basis=self.basis, valid_from=self.valid_from.isoformat() if self.valid_from else None,
                      valid_to=self.valid_to.isoformat() if self.valid_to else None)


def _file(value: Any) -> Any:
    if isinstance(value, str) and value.rstrip().endswith(("/", "\\")):
        raise ValueError(f"{value!r} names a folder: give the ledger file, e.g. {value.rstrip('/')}/ledger.db")
    return value


class LedgerConfig(Model):
    path: Annotated[FilePath, BeforeValidator(_file)] = Field(Path("var/ledger.db"), description=(
        "the SQLite ledger file (relative: from the config's folder); its folder is made if missing"))
    checkpoint_s: Float = Field(5.0, gt=0, le=3600, description=(
        "real seconds between checkpoints of open jobs (job, states, samples): after a crash or a "
        "restart the agent resumes them and loses at most this much of their samples"))
    retention_days: Float | None = Field(None, gt=0, le=36500, description=(
        "prune delivered records older than this many days (none: keep everything); chain heads "
        "stay verifiable through per-machine anchors"))
    hold_max: Int = Field(10000, ge=1, le=10_000_000, description=(
        "finished jobs held in memory while the ledger refuses writes; beyond it the agent stops "
        "with an error rather than lose more"))

    def file(self, base: Path) -> Path:
        """The ledger file, a relative path taken from ``base`` (the config's folder)."""
        return self.path if self.path.is_absolute() else base / self.path


class ArchiveConfig(Model):
    """The raw-sample archive: every job's kernel inputs, so ``energy-agent replay`` can
    recompute its record (docs/ARCHIVE.md)."""

    enabled: Bool = Field(True, description="append each recorded job's samples to the archive")
    path: FilePath | None = Field(None, description=(
        "archive folder, one file per machine and UTC day (default: 'archive' beside the ledger)"))

    def folder(self, ledger_path: Path, base: Path) -> Path:
        """The archive folder: ``path`` (relative to the config's folder), else beside the ledger."""
        if self.path is None:
            ledger = ledger_path if ledger_path.is_absolute() else base / ledger_path
            return ledger.parent / "archive"
        return self.path if self.path.is_absolute() else base / self.path


def path_problems(ledger: LedgerConfig, archive: ArchiveConfig, base: Path) -> list[str]:
    """What stops the ledger and the archive from being opened where the config puts them: a
    folder where the ledger file goes, a file where a folder goes. Missing folders are fine
    (they are made)."""
    try:
        return _path_problems(ledger, archive, base)
    except OSError as exc:  # a name too long, a loop of links
        return [f"ledger.path: cannot use {ledger.file(base)}: {exc.strerror or exc}"]


def _path_problems(ledger: LedgerConfig, archive: ArchiveConfig, base: Path) -> list[str]:
    problems = []
    file = ledger.file(base)
    if file.is_dir():
        problems.append(f"ledger.path: {file} is a folder: give the ledger file, e.g. {file / 'ledger.db'}")
    elif file.exists() and not file.is_file():
        problems.append(f"ledger.path: {file} is not a regular file")
    elif (blocker := _file_in_the_way(file.parent)) is not None:
        problems.append(f"ledger.path: {blocker} is a file, not a folder: {file} cannot be made")
    if archive.enabled:
        folder = archive.folder(ledger.path, base)
        where = "archive.path" if archive.path is not None else "archive (beside ledger.path)"
        if (blocker := _file_in_the_way(folder)) is not None:
            problems.append(f"{where}: {blocker} is a file, not a folder")
    return problems


def _file_in_the_way(folder: Path) -> Path | None:
    """The first existing ancestor of ``folder`` (itself included) that is not a folder, if any."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None
