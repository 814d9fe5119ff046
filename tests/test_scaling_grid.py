"""A real tiny scaling grid (2 archs x 2 subsets x 2 epochs on digits, local Ray, sqlite MLflow), then the
fit job on its runs; and the grid's input checks (no Ray)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mlpscale.errors import MlpscaleError
from mlpscale.scaling.grid import plan_grid, write_space

ARCHS, SUBSETS = ["B_1-Wi_16", "B_2-Wi_32"], [300, 600]


def tiny_overrides(digits_dir, tmp_path, uri) -> dict:
    return {
        "dataset": "digits",
        "resolution": 16,
        "data_dir": str(digits_dir),
        "epochs": 2,
        "batch_size": 64,
        "loader_workers": 1,
        "storage_path": str(tmp_path / "ray"),
        "tracking_uri": uri,
        "experiment": "grid",
        "precision": "fp32",
        "log_model": False,
    }


def test_grid_then_fit_reads_every_trial(digits_dir, tmp_path, tracking_uri, ray_local):
    from mlflow.tracking import MlflowClient

    from mlpscale.scaling.grid import run_scaling_grid
    from mlpscale.scaling.job import FitOptions, run_scaling_fit

    plan = plan_grid(
        archs=",".join(ARCHS), n_train="600,300", overrides=tiny_overrides(digits_dir, tmp_path, tracking_uri)
    )
    assert plan.base.schedule == "none" and plan.n_train == SUBSETS
    result = run_scaling_grid(plan, name="tiny-grid", storage_path=str(tmp_path / "ray"), max_concurrent=2)
    assert result.errors == 0

    client = MlflowClient(tracking_uri)
    trials = client.search_runs(
        [client.get_experiment_by_name("grid").experiment_id], filter_string="tags.`mlpscale.sweep_id` = 'tiny-grid'"
    )
    trials = [t for t in trials if t.data.tags.get("mlpscale.job") == "trial"]
    pairs = {(t.data.params["arch"], int(t.data.params["n_train"])) for t in trials}
    assert pairs == {(a, n) for a in ARCHS for n in SUBSETS}

    out = tmp_path / "fit"
    outcome = run_scaling_fit(FitOptions(sweep="tiny-grid", out=str(out), bootstrap=5))
    points = pd.read_parquet(out / "points.parquet")
    assert set(points["run_id"]) == {t.info.run_id for t in trials}
    assert sorted(points.groupby("run_id").size()) == [2, 2, 2, 2]  # every epoch of every trial is a point
    # compute of a point = 3 * forward FLOPs * N * epoch, as logged by the trials
    expected = 3 * points["forward_flops"] * points["n_train"] * points["epoch"]
    assert (points["compute_flops"] - expected).abs().max() <= 1e-6 * expected.max()
    document = json.loads((out / "fit.json").read_text())
    assert document["counts"]["runs"] == 4 and document["counts"]["model_sizes"] == 2
    # two model sizes and two data sizes are too few for the E(P), E(N) and joint fits: said, not guessed
    for entry in (document["params_law"], document["data_law"], document["allocation"]["parametric"]):
        assert entry["status"] == "insufficient_data" and entry["alpha" if "alpha" in entry else "alpha_P"] is None
        assert "at least" in entry["message"]
    assert document["compute_law"]["status"] in ("ok", "insufficient_data", "not_converged")
    if document["compute_law"]["status"] != "ok":
        assert document["compute_law"]["alpha"] is None
    fit_run = client.get_run(outcome.run_id)
    assert fit_run.data.tags["mlpscale.job"] == "scaling_fit"
    assert fit_run.data.tags["mlpscale.source_sweep_id"] == "tiny-grid"
    assert (out / "plots" / "compute.png").is_file()


def test_grid_plan_checks(digits_dir, tmp_path):
    from mlpscale.scaling.grid import ensure_subsets

    overrides = {"data_dir": str(digits_dir), "dataset": "digits", "resolution": 16, "batch_size": 32}
    with pytest.raises(MlpscaleError, match="B_x"):
        plan_grid(archs="B_2-Wi_32,B_x", n_train="300", overrides=overrides)
    with pytest.raises(MlpscaleError, match="--n-train item 'many'"):
        plan_grid(archs="B_2-Wi_32", n_train="300,many", overrides=overrides)
    with pytest.raises(MlpscaleError, match="smaller than batch_size=32"):
        plan_grid(archs="B_2-Wi_32", n_train="16,300", overrides=overrides)
    with pytest.raises(MlpscaleError, match="unknown grid preset"):
        plan_grid(preset="huge")
    with pytest.raises(MlpscaleError, match="exceed the .* training examples"):
        ensure_subsets(plan_grid(archs="B_2-Wi_32", n_train="300,100000", overrides=overrides))
    demo = plan_grid(preset="cpu-demo", overrides={"data_dir": str(digits_dir)})
    assert demo.size == 16 and demo.base.dataset == "digits" and demo.base.schedule == "none"
    paper = plan_grid(preset="paper")
    assert paper.base.batch_size == 16384 and paper.base.lr == 1e-5 and paper.base.mixup_alpha == 0.8
    assert "B_12-Wi_1024" in paper.archs
    space = write_space(demo, tmp_path / "space.yaml")
    from mlpscale.tune.space import load_space

    loaded = load_space(space)
    assert loaded.has_grid and loaded.grid_size == 16
