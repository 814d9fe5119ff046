"""Compute-optimal allocation between model size P and data size N at a fixed number of epochs T (Figure 7).

Two methods, as in Hoffmann et al. (2022):
- frontier (their first approach): take one point per run at epoch T, keep the compute-optimal
  frontier of those, and fit P*(C) ~ C^p and N*(C) ~ C^n as lines in log-log space;
- parametric (their third approach): fit E(P, N) = E_inf + A P^-alpha_P + B N^-alpha_N; with
  C = 3 k P N T (k = forward FLOPs per parameter) minimising E at fixed C gives
  P* = G K^p, N* = K / P*, K = C / (3 k T), G = (alpha_P A / (alpha_N B))^(1 / (alpha_P + alpha_N)),
  p = alpha_N / (alpha_P + alpha_N), n = alpha_P / (alpha_P + alpha_N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlpscale.scaling.fits import LawFit, fit_loglog_line, joint_law
from mlpscale.scaling.frontier import compute_frontier
from mlpscale.scaling.points import run_table


@dataclass
class FrontierAllocation:
    """P*(C) and N*(C) fitted on the compute-optimal runs at a fixed epoch."""

    runs: pd.DataFrame
    frontier: pd.DataFrame
    params_line: LawFit
    data_line: LawFit

    @property
    def ok(self) -> bool:
        return self.params_line.ok and self.data_line.ok


def allocation_runs(points: pd.DataFrame, epoch: int | None = None) -> pd.DataFrame:
    """One point per run at epoch T (`None`: each run's final epoch)."""
    return run_table(points, epoch)


def frontier_allocation(runs: pd.DataFrame) -> FrontierAllocation:
    """Fit P*(C) ~ C^p and N*(C) ~ C^n on the frontier of the per-run points."""
    frontier = compute_frontier(runs)
    what = "compute-optimal runs"
    params_line = fit_loglog_line(frontier["compute_flops"], frontier["num_params"], "P*(C)", what)
    data_line = fit_loglog_line(frontier["compute_flops"], frontier["n_train"], "N*(C)", what)
    if params_line.ok and len(np.unique(frontier["num_params"])) < 2:
        params_line.status, params_line.params, params_line.goodness = ("insufficient_data", None, None)
        params_line.message = "the compute-optimal runs all have the same model size; P*(C) needs at least 2"
    if data_line.ok and len(np.unique(frontier["n_train"])) < 2:
        data_line.status, data_line.params, data_line.goodness = "insufficient_data", None, None
        data_line.message = "the compute-optimal runs all have the same data size; N*(C) needs at least 2"
    return FrontierAllocation(runs, frontier, params_line, data_line)


def parametric_exponents(joint: LawFit) -> dict[str, float] | None:
    """p = alpha_N / (alpha_P + alpha_N) and n = alpha_P / (alpha_P + alpha_N) from a fitted joint law."""
    if not joint.ok:
        return None
    a_p, a_n = joint.params["alpha_P"], joint.params["alpha_N"]
    return {"params_exponent": a_n / (a_p + a_n), "data_exponent": a_p / (a_p + a_n)}


def flops_per_param(points: pd.DataFrame) -> float:
    """k in C = 3 k P N T: the median over points of compute / (3 P N T)."""
    ratio = points["compute_flops"] / (3.0 * points["num_params"] * points["n_train"] * points["epoch"])
    return float(np.median(ratio))


def parametric_optimum(joint: LawFit, compute: float, k: float, epochs: float) -> dict[str, float]:
    """The (P*, N*) minimising the joint law at compute C, and the error predicted there."""
    A, B = joint.params["A"], joint.params["B"]
    a_p, a_n = joint.params["alpha_P"], joint.params["alpha_N"]
    budget = compute / (3.0 * k * epochs)
    log_g = (np.log(a_p * A) - np.log(a_n * B)) / (a_p + a_n)
    log_p = log_g + a_n / (a_p + a_n) * np.log(budget)
    num_params, n_train = float(np.exp(log_p)), float(np.exp(np.log(budget) - log_p))
    return {
        "num_params": num_params,
        "n_train": n_train,
        "error": float(joint_law(num_params, n_train, **joint.params)),
    }


def frontier_optimum(allocation: FrontierAllocation, compute: float) -> dict[str, float]:
    """P*(C) and N*(C) from the frontier lines."""
    p, n = allocation.params_line.params, allocation.data_line.params
    return {
        "num_params": float(np.exp(p["intercept"] + p["slope"] * np.log(compute))),
        "n_train": float(np.exp(n["intercept"] + n["slope"] * np.log(compute))),
    }
