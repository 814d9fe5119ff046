"""Figures in the paper's style, each saved as PNG and SVG.

- compute.{png,svg} (Figures 1 and 5): log-log error against compute, colour = model size
  (blue small, red large), marker size = data size, a line joins a run's epochs, the frontier
  ringed and the fitted compute law dotted;
- bottlenecks.{png,svg} (Figure 6): error against parameters (left) and examples (right), fits dotted;
- allocation.{png,svg} (Figure 7): compute-optimal model size (left) and examples (right) against compute.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mlpscale.scaling.fits import LawFit, compute_law, power_law  # noqa: E402

COMPUTE_LABEL = "compute (FLOPs, 1 MAC = 1 FLOP)"


def _save(figure, out_dir: Path, name: str) -> list[Path]:
    figure.tight_layout()
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)
    return paths


def _size_colours(sizes) -> dict:
    sizes = sorted(set(sizes))
    cmap = plt.get_cmap("coolwarm")
    return {size: cmap(i / max(len(sizes) - 1, 1)) for i, size in enumerate(sizes)}


def _marker_sizes(n_train) -> dict:
    values = sorted(set(n_train))
    return {n: 20 + 100 * i / max(len(values) - 1, 1) for i, n in enumerate(values)}


def _fmt(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _law_label(name: str, fit: LawFit) -> str:
    params = fit.params
    return f"{name}: alpha={params['alpha']:.3g}, E_inf={params['e_inf']:.3g}"


def plot_compute(
    points: pd.DataFrame, frontier: pd.DataFrame, fit: LawFit, out_dir: Path, error_label: str
) -> list[Path]:
    """Figure 1/5: every run's epochs against compute, the frontier and the compute law."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    colours, markers = _size_colours(points["num_params"]), _marker_sizes(points["n_train"])
    for _, run in points.groupby("run_id"):
        run = run.sort_values("epoch")
        colour = colours[run["num_params"].iloc[0]]
        axis.plot(run["compute_flops"], run["error"], color=colour, alpha=0.5, lw=1)
        axis.scatter(
            run["compute_flops"],
            run["error"],
            color=colour,
            s=[markers[n] for n in run["n_train"]],
            alpha=0.8,
            edgecolors="none",
        )
    if not frontier.empty:
        axis.scatter(
            frontier["compute_flops"],
            frontier["error"],
            facecolors="none",
            edgecolors="black",
            s=60,
            lw=0.8,
            label="compute-optimal frontier",
        )
    if fit.ok:
        grid = np.geomspace(points["compute_flops"].min(), points["compute_flops"].max() * 3, 200)
        axis.plot(grid, compute_law(grid, **fit.params), "k:", lw=1.5, label=_law_label("E(C)", fit))
    for size, colour in colours.items():
        axis.plot([], [], color=colour, marker="o", ls="", label=f"P={_fmt(size)}")
    axis.set(xscale="log", yscale="log", xlabel=COMPUTE_LABEL, ylabel=error_label)
    axis.set_title("error against compute (marker size = data size, lines join a run's epochs)", fontsize=9)
    axis.legend(fontsize=7, loc="best")
    axis.grid(True, which="both", alpha=0.2)
    return _save(figure, out_dir, "compute")


def plot_bottlenecks(
    params_points: pd.DataFrame,
    params_fit: LawFit,
    data_points: pd.DataFrame,
    data_fit: LawFit,
    out_dir: Path,
    error_label: str,
) -> list[Path]:
    """Figure 6: parameter-bottlenecked (left) and data-bottlenecked (right) error."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        (axes[0], params_points, "num_params", params_fit, "parameters P", "E(P)"),
        (axes[1], data_points, "n_train", data_fit, "examples N", "E(N)"),
    )
    for axis, table, column, fit, label, name in panels:
        if not table.empty:
            axis.scatter(table[column], table["error"], color="tab:blue", zorder=3)
            if fit.ok:
                grid = np.geomspace(table[column].min(), table[column].max() * 2, 200)
                axis.plot(grid, power_law(grid, **fit.params), "k:", lw=1.5, label=_law_label(name, fit))
                axis.legend(fontsize=8)
            else:
                axis.set_title(f"no fit: {fit.status}", fontsize=8)
        axis.set(xscale="log", yscale="log", xlabel=label, ylabel=error_label)
        axis.grid(True, which="both", alpha=0.2)
    axes[0].set_title(axes[0].get_title() or "parameter-bottlenecked (largest data size)", fontsize=9)
    axes[1].set_title(axes[1].get_title() or "data-bottlenecked (best model per data size)", fontsize=9)
    return _save(figure, out_dir, "bottlenecks")


def plot_allocation(
    frontier: pd.DataFrame,
    params_line: LawFit,
    data_line: LawFit,
    parametric: dict | None,
    out_dir: Path,
    epoch_label: str,
) -> list[Path]:
    """Figure 7: optimal model size and number of examples against compute."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        (axes[0], "num_params", params_line, "params_exponent", "optimal parameters P*"),
        (axes[1], "n_train", data_line, "data_exponent", "optimal examples N*"),
    )
    for axis, column, line, exponent_key, label in panels:
        if not frontier.empty:
            axis.scatter(
                frontier["compute_flops"], frontier[column], color="tab:red", zorder=3, label="compute-optimal runs"
            )
            grid = np.geomspace(frontier["compute_flops"].min(), frontier["compute_flops"].max() * 3, 100)
            if line.ok:
                slope, intercept = line.params["slope"], line.params["intercept"]
                axis.plot(
                    grid, np.exp(intercept + slope * np.log(grid)), "k:", lw=1.5, label=f"frontier fit: C^{slope:.2f}"
                )
            if parametric and parametric.get(column) is not None:
                axis.plot(
                    grid, parametric[column](grid), "g--", lw=1, label=f"parametric: C^{parametric[exponent_key]:.2f}"
                )
            axis.legend(fontsize=8)
        axis.set(xscale="log", yscale="log", xlabel=COMPUTE_LABEL, ylabel=label)
        axis.set_title(f"compute-optimal allocation ({epoch_label})", fontsize=9)
        axis.grid(True, which="both", alpha=0.2)
    return _save(figure, out_dir, "allocation")
