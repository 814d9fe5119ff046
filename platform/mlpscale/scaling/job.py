"""The fit job: points (MLflow experiment, sweep, or file) -> fits -> fit.json, points.parquet, plots, MLflow run."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mlpscale.errors import MlpscaleError
from mlpscale.paths import repo_root
from mlpscale.scaling import plots
from mlpscale.scaling.points import EPOCH_MODES, clean_points, read_points_file
from mlpscale.scaling.report import Analysis, analyse

log = logging.getLogger(__name__)


@dataclass
class FitOptions:
    """What to fit and where to write it; exactly one of experiment, sweep, points."""

    experiment: str | None = None
    sweep: str | None = None
    points: str | None = None
    tracking_uri: str | None = None
    metric: str = "val_top1"
    epochs: str = "all"
    bootstrap: int = 200
    seed: int = 0
    predict_compute: float | None = None
    allocation_epoch: int | None = None
    jobs: tuple[str, ...] = ("pretrain", "trial")
    out: str | None = None
    fit_experiment: str | None = None
    log_mlflow: bool = True
    extra_warnings: list[str] = field(default_factory=list)


@dataclass
class FitOutcome:
    out_dir: Path
    document: dict
    run_id: str | None
    analysis: Analysis


def _validate(options: FitOptions) -> None:
    sources = [name for name in ("experiment", "sweep", "points") if getattr(options, name)]
    if len(sources) != 1:
        raise MlpscaleError(
            "give exactly one source: --experiment NAME, --sweep ID or --points FILE"
            + (f" (got {', '.join('--' + s for s in sources)})" if sources else "")
        )
    if options.epochs not in EPOCH_MODES:
        raise MlpscaleError(f"--epochs {options.epochs!r} is not allowed; use one of {', '.join(EPOCH_MODES)}")
    if options.bootstrap < 0:
        raise MlpscaleError(f"--bootstrap {options.bootstrap} must be >= 0 (0 skips the intervals)")
    if options.predict_compute is not None and not (
        math.isfinite(options.predict_compute) and options.predict_compute > 0
    ):
        raise MlpscaleError(f"--predict-compute {options.predict_compute} must be a positive number of FLOPs")


def _load(options: FitOptions) -> tuple[pd.DataFrame, dict, list[dict], list[str], list[str]]:
    """(raw table, source description, skipped runs, warnings, experiment ids)."""
    if options.points:
        table = read_points_file(options.points)
        return table, {"points_file": str(Path(options.points).resolve())}, [], [], []
    from mlpscale.tracking.queries import load_run_points

    loaded = load_run_points(
        experiment=options.experiment,
        sweep=options.sweep,
        tracking_uri=options.tracking_uri,
        metric=options.metric,
        jobs=options.jobs,
        epochs=options.epochs,
    )
    source = {
        "experiment": options.experiment,
        "sweep": options.sweep,
        "experiment_ids": loaded.experiment_ids,
        "runs_considered": loaded.runs_considered,
    }
    return loaded.table, source, loaded.skipped, loaded.warnings, loaded.experiment_ids


def _metrics_for_mlflow(document: dict) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for law, keys in (
        ("compute_law", ("alpha", "e_inf")),
        ("params_law", ("alpha", "e_inf")),
        ("data_law", ("alpha", "e_inf")),
    ):
        for key in keys:
            if document[law][key] is not None:
                metrics[f"{law}.{key}"] = document[law][key]
        goodness = document[law]["goodness"]
        if goodness:
            metrics[f"{law}.r2_log"] = goodness["r2_log"]
    for method in ("frontier", "parametric"):
        entry = document["allocation"][method]
        for key in ("params_exponent", "data_exponent"):
            if entry[key] is not None:
                metrics[f"allocation.{method}.{key}"] = entry[key]
    metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
    return metrics


def run_scaling_fit(options: FitOptions) -> FitOutcome:
    """Build the points table, fit every law, write --out DIR and log it all to an MLflow run."""
    _validate(options)
    raw, source, skipped, warnings, experiment_ids = _load(options)
    cleaned = clean_points(raw, options.epochs)
    points = cleaned.table
    if points.empty:
        raise MlpscaleError(
            f"no usable points from {json.dumps(source)} (metric {options.metric!r}); "
            f"{len(skipped)} run(s) skipped"
            + (f": {skipped[0]['reason']}" if skipped else "")
            + ". Check the source and --metric"
        )
    analysis = analyse(
        points,
        n_boot=options.bootstrap,
        seed=options.seed,
        allocation_epoch=options.allocation_epoch,
        predict_compute=options.predict_compute,
    )
    document = analysis.document
    all_warnings = list(options.extra_warnings) + warnings + cleaned.warnings + document["warnings"]
    document.update(
        {
            "source": source,
            "metric": options.metric if not options.points else "error",
            "error_definition": _error_definition(options),
            "epochs": options.epochs,
            "bootstrap": {"replicates": options.bootstrap, "seed": options.seed, "resampled": "runs"},
            "compute_convention": "C = 3 * forward_flops * n_train * epoch; 1 MAC = 1 FLOP",
            "warnings": all_warnings,
            "skipped_runs": skipped,
        }
    )
    document["counts"].update(
        {
            "dropped_nan": cleaned.dropped_nan,
            "dropped_nonpositive": cleaned.dropped_nonpositive,
            "skipped_runs": len(skipped),
        }
    )
    for message in document["warnings"]:
        log.warning(message)

    out_dir = Path(options.out) if options.out else repo_root() / "outputs" / "scaling-fit"
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    points.to_parquet(out_dir / "points.parquet", index=False)
    error_label = f"error ({document['error_definition']})"
    plots.plot_compute(points, analysis.frontier, analysis.compute_fit, out_dir / "plots", error_label)
    plots.plot_bottlenecks(
        analysis.params_points,
        analysis.params_fit,
        analysis.data_points,
        analysis.data_fit,
        out_dir / "plots",
        error_label,
    )
    plots.plot_allocation(
        analysis.allocation.frontier,
        analysis.allocation.params_line,
        analysis.allocation.data_line,
        _parametric_curves(analysis),
        out_dir / "plots",
        analysis.epoch_label,
    )

    run_id = None
    if options.log_mlflow:
        from mlpscale.tracking.queries import TAG_SOURCE_EXPERIMENT, TAG_SOURCE_SWEEP, log_fit_run

        tags = {}
        if experiment_ids:
            tags[TAG_SOURCE_EXPERIMENT] = ",".join(experiment_ids)
        if options.sweep:
            tags[TAG_SOURCE_SWEEP] = options.sweep
        params = {
            "source": options.experiment or options.sweep or options.points,
            "metric": options.metric,
            "epochs": options.epochs,
            "bootstrap": options.bootstrap,
            "seed": options.seed,
            "allocation_epoch": options.allocation_epoch,
            "n_runs": document["counts"]["runs"],
            "n_points": document["counts"]["points"],
            "status": document["status"],
        }
        if options.predict_compute is not None:
            params["predict_compute"] = options.predict_compute
        # the fit run sits beside its source runs unless told otherwise
        target_id = experiment_ids[0] if (experiment_ids and not options.fit_experiment) else None
        document["mlflow"] = {"experiment_id": target_id}
        _write_json(document, out_dir / "fit.json")
        run_id, experiment_id = log_fit_run(
            tracking_uri=options.tracking_uri,
            experiment=options.fit_experiment,
            experiment_id=target_id,
            run_name=f"scaling-fit-{options.experiment or options.sweep or Path(options.points).stem}",
            tags=tags,
            params=params,
            metrics=_metrics_for_mlflow(document),
            out_dir=out_dir,
        )
        document["mlflow"] = {"run_id": run_id, "experiment_id": experiment_id}
    _write_json(document, out_dir / "fit.json")
    log.info("fit written to %s (status %s)%s", out_dir, document["status"], f", MLflow run {run_id}" if run_id else "")
    return FitOutcome(out_dir, document, run_id, analysis)


def _error_definition(options: FitOptions) -> str:
    if options.points:
        return "error column of the points file"
    lowered = options.metric.lower()
    return options.metric if ("loss" in lowered or "err" in lowered) else f"1 - {options.metric}"


def _parametric_curves(analysis: Analysis) -> dict | None:
    """P*(C), N*(C) of the joint law for the allocation plot, at the runs' epoch count."""
    import numpy as np

    from mlpscale.scaling import allocation as alloc

    exponents = alloc.parametric_exponents(analysis.joint_fit)
    runs = analysis.allocation.runs
    if exponents is None or runs.empty:
        return None
    k, epochs = alloc.flops_per_param(analysis.points), float(np.median(runs["epoch"]))

    def curve(column):
        return lambda grid: np.array([alloc.parametric_optimum(analysis.joint_fit, c, k, epochs)[column] for c in grid])

    return {"num_params": curve("num_params"), "n_train": curve("n_train"), **exponents}


def _write_json(document: dict, path: Path) -> None:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item"):
            return clean(value.item())
        return value

    path.write_text(json.dumps(clean(document), indent=2))
