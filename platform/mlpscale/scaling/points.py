"""The points table of a scaling study: one row per (run, epoch), read from CSV/Parquet, validated and cleaned.

Columns: run_id, num_params, n_train, epoch, compute_flops, error (error in (0, 1]-ish units,
compute in FLOPs with 1 MAC = 1 FLOP). Extra columns (arch, forward_flops, ...) are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mlpscale.errors import MlpscaleError

log = logging.getLogger(__name__)

POINT_COLUMNS = ("run_id", "num_params", "n_train", "epoch", "compute_flops", "error")
NUMERIC_COLUMNS = ("num_params", "n_train", "epoch", "compute_flops", "error")
EPOCH_MODES = ("all", "final")


@dataclass
class CleanPoints:
    """A validated points table and what was dropped to get it."""

    table: pd.DataFrame
    dropped_nan: int = 0
    dropped_nonpositive: int = 0
    warnings: list[str] = field(default_factory=list)


def read_points_file(path: str | Path) -> pd.DataFrame:
    """Read a points table from .csv or .parquet; MlpscaleError names a missing file, bad suffix or missing columns."""
    path = Path(path)
    if not path.exists():
        raise MlpscaleError(
            f"--points {path}: no such file; give a CSV or Parquet file with columns {', '.join(POINT_COLUMNS)}"
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        table = pd.read_parquet(path)
    else:
        raise MlpscaleError(f"--points {path}: unknown file type {suffix!r}; use .csv or .parquet")
    return validate_columns(table, source=str(path))


def validate_columns(table: pd.DataFrame, source: str = "points table") -> pd.DataFrame:
    """Check the required columns exist and are numeric; returns a copy with run_id as str."""
    missing = [c for c in POINT_COLUMNS if c not in table.columns]
    if missing:
        raise MlpscaleError(
            f"{source}: missing column(s) {', '.join(missing)}; a points table needs {', '.join(POINT_COLUMNS)}"
        )
    table = table.copy()
    table["run_id"] = table["run_id"].astype(str)
    for column in NUMERIC_COLUMNS:
        converted = pd.to_numeric(table[column], errors="coerce")
        bad = converted.isna() & table[column].notna()
        if bad.any():
            example = table.loc[bad, column].iloc[0]
            raise MlpscaleError(
                f"{source}: column {column!r} has non-numeric value {example!r}; every value must be a number"
            )
        table[column] = converted.astype(float)
    return table


def clean_points(table: pd.DataFrame, epochs: str = "all") -> CleanPoints:
    """Drop NaN rows and non-positive values (counted), then keep all epochs or each run's final one."""
    if epochs not in EPOCH_MODES:
        raise MlpscaleError(f"epochs={epochs!r} is not allowed; use one of {', '.join(EPOCH_MODES)}")
    table = validate_columns(table)
    nan_rows = table[list(NUMERIC_COLUMNS)].isna().any(axis=1) | ~np.isfinite(
        table[list(NUMERIC_COLUMNS)].to_numpy(dtype=float)
    ).all(axis=1)
    dropped_nan = int(nan_rows.sum())
    table = table[~nan_rows]
    nonpositive = (table[list(NUMERIC_COLUMNS)] <= 0).any(axis=1)
    dropped_nonpositive = int(nonpositive.sum())
    table = table[~nonpositive]
    result = CleanPoints(table=table, dropped_nan=dropped_nan, dropped_nonpositive=dropped_nonpositive)
    if dropped_nan:
        result.warnings.append(f"dropped {dropped_nan} point(s) with NaN or infinite values")
    if dropped_nonpositive:
        result.warnings.append(
            f"dropped {dropped_nonpositive} point(s) with a zero or negative value "
            f"(error, compute, params and data size must be > 0 for log-log fits)"
        )
    if epochs == "final" and len(table):
        last = table.groupby("run_id")["epoch"].transform("max")
        table = table[table["epoch"] == last]
    result.table = table.sort_values(["run_id", "epoch"]).reset_index(drop=True)
    return result


def run_table(points: pd.DataFrame, epoch: int | None = None) -> pd.DataFrame:
    """One row per run: the point at `epoch` (runs without it are left out), or each run's final epoch."""
    if epoch is None:
        last = points.groupby("run_id")["epoch"].transform("max")
        chosen = points[points["epoch"] == last]
    else:
        chosen = points[points["epoch"] == float(epoch)]
    return chosen.drop_duplicates("run_id", keep="last").reset_index(drop=True)


def resample_runs(points: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """A bootstrap replicate: runs drawn with replacement, each draw keeping all of that run's points."""
    runs = points["run_id"].unique()
    drawn = rng.choice(runs, size=len(runs), replace=True)
    groups = dict(tuple(points.groupby("run_id", sort=False)))
    parts = []
    for copy, run in enumerate(drawn):
        part = groups[run].copy()
        part["run_id"] = f"{run}#{copy}"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
