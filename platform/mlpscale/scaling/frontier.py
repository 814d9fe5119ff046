"""Which points a law is fitted to: the compute-optimal frontier and the parameter-/data-bottlenecked bests.

- compute frontier: sorted by compute, the points whose error is strictly below every point of
  smaller or equal compute (the lower envelope of Figure 1);
- parameter-bottlenecked (Figure 6 left): data is plentiful, so for each model size the best error
  over all epochs of its runs at the largest data size of the study; model sizes never trained on
  that data size are left out;
- data-bottlenecked (Figure 6 right): for each data size the best error over all model sizes and epochs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def compute_frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The lower envelope of error against compute: each kept point beats everything cheaper or as cheap."""
    if points.empty:
        return points.copy()
    ordered = points.sort_values(["compute_flops", "error"], kind="mergesort")
    best_at_compute = ordered.drop_duplicates("compute_flops", keep="first")
    errors = best_at_compute["error"].to_numpy()
    previous_best = np.minimum.accumulate(np.concatenate([[np.inf], errors[:-1]]))
    keep = errors < previous_best
    return best_at_compute[keep].reset_index(drop=True)


def params_bottlenecked(points: pd.DataFrame) -> pd.DataFrame:
    """Per model size, the best point among the runs at the study's largest data size."""
    if points.empty:
        return points.copy()
    largest = points["n_train"].max()
    at_largest = points[points["n_train"] == largest]
    best = at_largest.loc[at_largest.groupby("num_params")["error"].idxmin()]
    return best.sort_values("num_params").reset_index(drop=True)


def data_bottlenecked(points: pd.DataFrame) -> pd.DataFrame:
    """Per data size, the best point over all model sizes and epochs."""
    if points.empty:
        return points.copy()
    best = points.loc[points.groupby("n_train")["error"].idxmin()]
    return best.sort_values("n_train").reset_index(drop=True)


def left_out_model_sizes(points: pd.DataFrame) -> list[float]:
    """Model sizes with no run at the largest data size (not on the parameter-bottlenecked curve)."""
    if points.empty:
        return []
    largest = points["n_train"].max()
    present = set(points.loc[points["n_train"] == largest, "num_params"])
    return sorted(set(points["num_params"]) - present)
