"""All fits of a scaling study from one clean points table, assembled into the fit.json document.

A law that cannot be fitted keeps its keys with null numbers and says why in `status` and `message`;
laws whose parameters end on a bound are listed in `warnings`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlpscale.scaling import allocation as alloc
from mlpscale.scaling.fits import OK, LawFit, bootstrap_ci, compute_law, fit_compute_law, fit_joint_law, fit_power_law
from mlpscale.scaling.frontier import compute_frontier, data_bottlenecked, left_out_model_sizes, params_bottlenecked

log = logging.getLogger(__name__)

COMPUTE_KEYS = ("a", "b", "alpha", "e_inf")
POWER_KEYS = ("a", "alpha", "e_inf")
JOINT_KEYS = ("e_inf", "A", "B", "alpha_P", "alpha_N")


@dataclass
class Analysis:
    """The fit.json document and the tables and fits the plots are drawn from."""

    document: dict
    points: pd.DataFrame
    frontier: pd.DataFrame
    params_points: pd.DataFrame
    data_points: pd.DataFrame
    compute_fit: LawFit
    params_fit: LawFit
    data_fit: LawFit
    allocation: alloc.FrontierAllocation
    joint_fit: LawFit
    epoch_label: str
    warnings: list[str] = field(default_factory=list)


def _law_entry(fit: LawFit, keys, ci: dict | None) -> dict:
    entry = {"status": fit.status, "message": fit.message}
    entry.update({key: (fit.params[key] if fit.ok else None) for key in keys})
    entry["ci"] = ci if fit.ok else None
    entry["n_points"] = fit.n_points
    entry["at_bounds"] = fit.at_bounds
    entry["goodness"] = fit.goodness
    return entry


def _warm(fit: LawFit) -> dict | None:
    return dict(fit.params) if fit.ok else None


def _compute_estimate(initial):
    def estimate(points):
        frontier = compute_frontier(points)
        fit = fit_compute_law(frontier["compute_flops"], frontier["error"], initial=initial)
        return {k: fit.params[k] for k in COMPUTE_KEYS} if fit.ok else None

    return estimate


def _power_estimate(select, column, initial):
    def estimate(points):
        chosen = select(points)
        fit = fit_power_law(chosen[column], chosen["error"], initial=initial)
        return {k: fit.params[k] for k in POWER_KEYS} if fit.ok else None

    return estimate


def _frontier_estimate(epoch):
    def estimate(points):
        result = alloc.frontier_allocation(alloc.allocation_runs(points, epoch))
        if not result.ok:
            return None
        return {
            "params_exponent": result.params_line.params["slope"],
            "data_exponent": result.data_line.params["slope"],
        }

    return estimate


def _joint_estimate(epoch, initial):
    def estimate(points):
        runs = alloc.allocation_runs(points, epoch)
        fit = fit_joint_law(runs["num_params"], runs["n_train"], runs["error"], initial=initial)
        exponents = alloc.parametric_exponents(fit)
        if exponents is None:
            return None
        return {**exponents, "alpha_P": fit.params["alpha_P"], "alpha_N": fit.params["alpha_N"]}

    return estimate


def analyse(
    points: pd.DataFrame,
    *,
    n_boot: int = 200,
    seed: int = 0,
    allocation_epoch: int | None = None,
    predict_compute: float | None = None,
) -> Analysis:
    """Every law of section 4.3 on a clean points table, bootstrap intervals by resampling runs."""
    warnings: list[str] = []
    frontier = compute_frontier(points)
    compute_fit = fit_compute_law(frontier["compute_flops"], frontier["error"])

    params_points = params_bottlenecked(points)
    params_fit = fit_power_law(params_points["num_params"], params_points["error"], "params_law", "model sizes")
    left_out = left_out_model_sizes(points)
    if left_out:
        warnings.append(
            f"params_law: model size(s) {', '.join(f'{p:.4g}' for p in left_out)} have no run at "
            f"the largest data size {points['n_train'].max():.4g} and are left out"
        )
    data_points = data_bottlenecked(points)
    data_fit = fit_power_law(data_points["n_train"], data_points["error"], "data_law", "data sizes")

    runs = alloc.allocation_runs(points, allocation_epoch)
    if allocation_epoch is not None and runs.empty:
        warnings.append(f"allocation: no run logged epoch {allocation_epoch}")
    frontier_alloc = alloc.frontier_allocation(runs)
    joint_fit = fit_joint_law(runs["num_params"], runs["n_train"], runs["error"])
    epoch_label = f"epoch {allocation_epoch}" if allocation_epoch is not None else "each run's final epoch"

    def ci(fit: LawFit, estimate) -> dict | None:
        if not fit.ok or n_boot <= 0:
            return None
        return bootstrap_ci(points, estimate, n_boot, seed)

    compute_ci = ci(compute_fit, _compute_estimate(_warm(compute_fit)))
    params_ci = ci(params_fit, _power_estimate(params_bottlenecked, "num_params", _warm(params_fit)))
    data_ci = ci(data_fit, _power_estimate(data_bottlenecked, "n_train", _warm(data_fit)))
    frontier_ci = (
        bootstrap_ci(points, _frontier_estimate(allocation_epoch), n_boot, seed)
        if frontier_alloc.ok and n_boot > 0
        else None
    )
    joint_ci = ci(joint_fit, _joint_estimate(allocation_epoch, _warm(joint_fit)))

    for fit in (compute_fit, params_fit, data_fit, joint_fit):
        if fit.ok and fit.at_bounds:
            warnings.append(
                f"{fit.law}: {', '.join(fit.at_bounds)} ended on its bound; the data do not "
                f"constrain it (treat the value as a limit, not an estimate)"
            )
    for name, ci_dict in (
        ("compute_law", compute_ci),
        ("params_law", params_ci),
        ("data_law", data_ci),
        ("allocation.frontier", frontier_ci),
        ("allocation.parametric", joint_ci),
    ):
        if ci_dict and ci_dict["n_failed"] > ci_dict["n_boot"] // 2:
            warnings.append(
                f"{name}: {ci_dict['n_failed']} of {ci_dict['n_boot']} bootstrap replicates could "
                f"not be fitted; the interval is unreliable"
            )

    frontier_entry = {
        "status": OK
        if frontier_alloc.ok
        else (
            frontier_alloc.params_line.status if not frontier_alloc.params_line.ok else frontier_alloc.data_line.status
        ),
        "message": "; ".join(m for m in (frontier_alloc.params_line.message, frontier_alloc.data_line.message) if m),
        "method": "frontier",
        "params_exponent": frontier_alloc.params_line.params["slope"] if frontier_alloc.ok else None,
        "data_exponent": frontier_alloc.data_line.params["slope"] if frontier_alloc.ok else None,
        "ci": frontier_ci,
        "n_points": int(len(frontier_alloc.frontier)),
        "goodness": {"params": frontier_alloc.params_line.goodness, "data": frontier_alloc.data_line.goodness}
        if frontier_alloc.ok
        else None,
    }
    exponents = alloc.parametric_exponents(joint_fit)
    parametric_entry = {
        "method": "parametric",
        **_law_entry(joint_fit, JOINT_KEYS, joint_ci),
        "params_exponent": exponents["params_exponent"] if exponents else None,
        "data_exponent": exponents["data_exponent"] if exponents else None,
    }

    fits = {"compute_law": compute_fit, "params_law": params_fit, "data_law": data_fit}
    statuses = [compute_fit.status, params_fit.status, data_fit.status, frontier_entry["status"], joint_fit.status]
    document = {
        "status": "ok"
        if all(s == OK for s in statuses)
        else ("failed" if all(s != OK for s in statuses) else "partial"),
        "counts": {
            "runs": int(points["run_id"].nunique()),
            "points": int(len(points)),
            "frontier_points": int(len(frontier)),
            "model_sizes": int(points["num_params"].nunique()),
            "data_sizes": int(points["n_train"].nunique()),
            "allocation_runs": int(len(runs)),
        },
        "compute_law": _law_entry(compute_fit, COMPUTE_KEYS, compute_ci),
        "params_law": _law_entry(params_fit, POWER_KEYS, params_ci),
        "data_law": _law_entry(data_fit, POWER_KEYS, data_ci),
        "allocation": {"epoch": allocation_epoch, "frontier": frontier_entry, "parametric": parametric_entry},
        "goodness_of_fit": {
            **{name: fit.goodness for name, fit in fits.items()},
            "allocation_frontier": frontier_entry["goodness"],
            "allocation_parametric": joint_fit.goodness,
        },
        "prediction": None,
        "warnings": warnings,
    }
    if predict_compute is not None:
        document["prediction"] = predict(predict_compute, points, runs, compute_fit, frontier_alloc, joint_fit)
    return Analysis(
        document,
        points,
        frontier,
        params_points,
        data_points,
        compute_fit,
        params_fit,
        data_fit,
        frontier_alloc,
        joint_fit,
        epoch_label,
        warnings,
    )


def predict(
    compute: float,
    points: pd.DataFrame,
    runs: pd.DataFrame,
    compute_fit: LawFit,
    frontier_alloc: alloc.FrontierAllocation,
    joint_fit: LawFit,
) -> dict:
    """The recommended model size and data size for budget C, and the predicted error, from each fitted law."""
    result: dict = {"compute_flops": float(compute)}
    result["error_compute_law"] = float(compute_law(compute, **compute_fit.params)) if compute_fit.ok else None
    result["frontier"] = (
        alloc.frontier_optimum(frontier_alloc, compute)
        if frontier_alloc.ok
        else {"status": "unavailable", "message": "the frontier allocation was not fitted"}
    )
    if joint_fit.ok and len(runs):
        epochs = float(np.median(runs["epoch"]))
        k = alloc.flops_per_param(points)
        result["parametric"] = {
            **alloc.parametric_optimum(joint_fit, compute, k, epochs),
            "epochs": epochs,
            "flops_per_param": k,
        }
    else:
        result["parametric"] = {"status": "unavailable", "message": "the joint law E(P, N) was not fitted"}
    return result
