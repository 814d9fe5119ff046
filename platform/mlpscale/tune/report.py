"""End-of-sweep outputs: the trials table as text, CSV and Parquet, Optuna's importance and history plots, and
the summary the sweep jobs print."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mlpscale.tune.space import SearchSpace

if TYPE_CHECKING:
    from mlpscale.tune.sweep import SweepResult

log = logging.getLogger(__name__)


def write_table(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """trials.csv and trials.parquet in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, parquet = out_dir / "trials.csv", out_dir / "trials.parquet"
    table.to_csv(csv, index=False)
    table.to_parquet(parquet, index=False)
    return [csv, parquet]


def format_table(table: pd.DataFrame, fields: list[str], metric: str) -> str:
    """The trials as a fixed-width text table: trial, status, config, best metric, epochs run."""
    columns = ["trial_id", "status", *fields, f"best_{metric}", "epochs_run", "epochs"]
    shown = table[columns].copy()
    for column in [*fields, f"best_{metric}"]:
        shown[column] = shown[column].map(_short)
    shown["epochs_run"] = [f"{int(run)}/{int(total)}" for run, total in zip(table["epochs_run"], table["epochs"])]
    shown = shown.drop(columns=["epochs"]).rename(columns={"epochs_run": "epochs"})
    return shown.to_string(index=False)


def summary(result: SweepResult) -> str:
    """What jobs/tune.py and jobs/scaling_grid.py print at the end: the trials table, the best trial and its
    config file (or that none finished), the MLflow parent run and the Tune experiment folder."""
    lines = [format_table(result.table, result.fields, result.metric)]
    if result.best_config_path is not None:
        best_value = result.best[f"best_{result.metric}"]
        lines.append(f"best trial {result.best['best_trial_id']}: {result.metric}={best_value:.4f}")
        lines.append(
            f"best config: {result.best_config_path}  (train it with: python jobs/pretrain.py --config "
            f"{result.best_config_path})"
        )
    else:
        lines.append("no trial finished: no best config")
    lines.append(
        f"MLflow parent run: {result.parent_run_id} (experiment {result.experiment}); "
        f"Tune experiment: {result.experiment_dir}"
    )
    return "\n".join(lines)


def _short(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def optuna_study(table: pd.DataFrame, space: SearchSpace, metric: str, mode: str):
    """An Optuna study holding the finished trials (so optuna's importance and plots can read them)."""
    import optuna

    distributions = {p.field: _distribution(p) for p in space.params}
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for row in table.itertuples(index=False):
        row = row._asdict()
        value = row.get(f"best_{metric}")
        if row["status"] != "FINISHED" or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        params = {}
        for field, distribution in distributions.items():
            raw = row.get(field)
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                raw = next((c for c in distribution.choices if str(c) == str(raw)), None)
                if raw is None:
                    break
            params[field] = raw
        else:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(value)))
    return study


def _distribution(p):
    import optuna.distributions as d

    if p.values is not None:
        return d.CategoricalDistribution([str(v) if isinstance(v, tuple) else v for v in p.values])
    if p.distribution == "int":
        return d.IntDistribution(int(p.low), int(p.high), log=p.log)
    return d.FloatDistribution(float(p.low), float(p.high), log=p.log)


def write_plots(table: pd.DataFrame, space: SearchSpace, metric: str, mode: str, out_dir: Path) -> list[Path]:
    """plots/optimization_history.png and plots/param_importances.png (when there are enough finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    study = optuna_study(table, space, metric, mode)
    written = []
    if not study.trials:
        log.warning("no finished trials: no optimisation history or importances to plot")
        return written
    jobs = [("optimization_history.png", optuna_plots.plot_optimization_history)]
    if len(study.trials) >= 2 and len(space.params) >= 1:
        jobs.append(("param_importances.png", optuna_plots.plot_param_importances))
    for name, plot in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study, target_name=f"best {metric}")
            axes.figure.tight_layout()
            axes.figure.savefig(plots / name, dpi=120)
            plt.close(axes.figure)
            written.append(plots / name)
        except Exception as error:  # optuna refuses e.g. importances when every trial scored the same
            log.warning("could not draw %s: %s", name, error)
    return written
