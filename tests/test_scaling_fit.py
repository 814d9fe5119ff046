"""Scaling-law fits: known laws come back from noisy points, frontiers on hand-made cases, bad inputs,
and the fit job end to end on runs logged by hand into a real sqlite MLflow store (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mlpscale.errors import MlpscaleError
from mlpscale.scaling import allocation as alloc
from mlpscale.scaling.fits import compute_law, fit_compute_law, fit_joint_law, fit_power_law, joint_law
from mlpscale.scaling.frontier import compute_frontier, data_bottlenecked, params_bottlenecked
from mlpscale.scaling.job import FitOptions, run_scaling_fit
from mlpscale.scaling.points import clean_points, read_points_file
from mlpscale.scaling.report import analyse

# The paper's observations (alpha_P ~ 1, alpha_N ~ 0.35) as the ground truth of the synthetic study.
TRUE = {"e_inf": 0.1, "A": 3e5, "B": 8.0, "alpha_P": 1.0, "alpha_N": 0.35}
NOISE = 0.01  # multiplicative, 1 %
# Tolerances on recovered exponents with 1 % noise (absolute): stated once, used by every test below.
TOL_ALPHA_P, TOL_ALPHA_N, TOL_P = 0.1, 0.05, 0.03


def grid_points(seed: int = 0, sizes=5, epochs=(1, 2, 4, 8)) -> pd.DataFrame:
    """A synthetic grid: error = joint law + an epoch term, 1 % noise; forward FLOPs = parameters."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in np.logspace(6, 8, sizes):
        for n in np.logspace(4, 6.5, sizes):
            for t in epochs:
                error = (joint_law(p, n, **TRUE) + 0.3 / t) * np.exp(rng.normal(0, NOISE))
                rows.append(
                    {
                        "run_id": f"P{p:.0f}-N{n:.0f}",
                        "num_params": p,
                        "n_train": n,
                        "epoch": t,
                        "compute_flops": 3 * p * n * t,
                        "error": error,
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_compute_law_recovers_exponent_and_floor(seed):
    rng = np.random.default_rng(seed)
    compute = np.logspace(14, 19, 25)
    error = compute_law(compute, a=2e4, b=1e13, alpha=0.3, e_inf=0.1) * np.exp(rng.normal(0, NOISE, 25))
    fit = fit_compute_law(compute, error)
    assert fit.status == "ok", fit.message
    assert fit.params["alpha"] == pytest.approx(0.3, abs=0.03)
    assert fit.params["e_inf"] == pytest.approx(0.1, abs=0.01)
    assert fit.goodness["r2_log"] > 0.99


def test_params_and_data_laws_recover_exponents():
    points = grid_points()
    by_params, by_data = params_bottlenecked(points), data_bottlenecked(points)
    params_fit = fit_power_law(by_params["num_params"], by_params["error"], "params_law")
    data_fit = fit_power_law(by_data["n_train"], by_data["error"], "data_law")
    assert params_fit.ok and data_fit.ok
    assert params_fit.params["alpha"] == pytest.approx(TRUE["alpha_P"], abs=TOL_ALPHA_P)
    assert data_fit.params["alpha"] == pytest.approx(TRUE["alpha_N"], abs=TOL_ALPHA_N)


def test_joint_law_recovers_exponents_and_allocation():
    runs = alloc.allocation_runs(grid_points(seed=2))
    fit = fit_joint_law(runs["num_params"], runs["n_train"], runs["error"])
    assert fit.ok, fit.message
    assert fit.params["alpha_P"] == pytest.approx(TRUE["alpha_P"], abs=TOL_ALPHA_P)
    assert fit.params["alpha_N"] == pytest.approx(TRUE["alpha_N"], abs=TOL_ALPHA_N)
    exponents = alloc.parametric_exponents(fit)
    true_p = TRUE["alpha_N"] / (TRUE["alpha_P"] + TRUE["alpha_N"])
    assert exponents["params_exponent"] == pytest.approx(true_p, abs=TOL_P)
    assert exponents["data_exponent"] == pytest.approx(1 - true_p, abs=TOL_P)
    # the closed-form optimum is the joint law's minimum along the iso-compute line P * N = K
    optimum = alloc.parametric_optimum(fit, 1e18, k=1.0, epochs=8)
    budget = 1e18 / (3 * 8)
    for factor in (0.5, 2.0):
        other = joint_law(optimum["num_params"] * factor, budget / (optimum["num_params"] * factor), **fit.params)
        assert other > optimum["error"]


def test_frontier_allocation_splits_compute_between_params_and_data():
    allocation = alloc.frontier_allocation(alloc.allocation_runs(grid_points()))
    assert allocation.ok
    p, n = allocation.params_line.params["slope"], allocation.data_line.params["slope"]
    # at fixed T with FLOPs proportional to parameters, C ~ P N so the exponents sum to one
    assert p + n == pytest.approx(1.0, abs=1e-6)
    assert 0 < p < n  # this study's data exponent is the larger, as the paper observes for MLPs


def test_compute_frontier_on_hand_made_points():
    points = pd.DataFrame(
        {
            "run_id": list("abcdefg"),
            "compute_flops": [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "error": [0.9, 0.8, 0.7, 0.75, 0.6, 0.6, 0.5],
            "num_params": 1.0,
            "n_train": 1.0,
            "epoch": 1.0,
        }
    )
    frontier = compute_frontier(points)
    # c at compute 2 beats b there; d is worse than c; f only ties e, so it is not a strict improvement
    assert list(frontier["run_id"]) == ["a", "c", "e", "g"]


def test_bottlenecked_points_on_hand_made_grid():
    points = pd.DataFrame(
        {
            "run_id": ["s1", "s1", "s2", "l1", "l2", "l2"],
            "num_params": [10, 10, 10, 100, 100, 100],
            "n_train": [50, 50, 500, 50, 500, 500],
            "epoch": [1, 2, 1, 1, 1, 2],
            "compute_flops": [1, 2, 3, 4, 5, 6],
            "error": [0.5, 0.4, 0.45, 0.35, 0.3, 0.2],
        }
    ).astype({"num_params": float, "n_train": float, "epoch": float, "compute_flops": float})
    by_params = params_bottlenecked(points)  # only runs at n_train = 500
    assert list(zip(by_params["num_params"], by_params["error"])) == [(10, 0.45), (100, 0.2)]
    by_data = data_bottlenecked(points)  # best over sizes and epochs
    assert list(zip(by_data["n_train"], by_data["error"])) == [(50, 0.35), (500, 0.2)]


def test_too_few_points_are_reported_with_what_is_needed():
    fit = fit_compute_law([1e12, 1e13, 1e14], [0.5, 0.4, 0.3])
    assert fit.status == "insufficient_data" and fit.params is None
    assert "at least 5" in fit.message and "got 3" in fit.message
    power = fit_power_law([1e6, 1e7, 1e8], [0.5, 0.4, 0.3], "params_law", "model sizes")
    assert power.status == "insufficient_data" and "at least 4 distinct model sizes" in power.message
    joint = fit_joint_law([1e6, 1e6, 1e7, 1e7], [1e4, 1e5, 1e4, 1e5], [0.5, 0.4, 0.45, 0.3])
    assert joint.status == "insufficient_data" and "2 model sizes, 2 data sizes" in joint.message


def test_a_pinned_exponent_is_reported_not_returned_as_numbers():
    rising = np.linspace(0.2, 0.3, 8)
    fit = fit_compute_law(np.logspace(12, 16, 8), rising)
    assert fit.status == "not_converged" and "alpha" in fit.message
    # a study whose error grows with model size: the params law has no usable fit, so no numbers
    sizes = np.logspace(6, 8, 6)
    study = pd.DataFrame(
        {
            "run_id": [f"r{i}" for i in range(6)],
            "num_params": sizes,
            "n_train": 1000.0,
            "epoch": 1.0,
            "compute_flops": 3e3 * sizes,
            "error": np.linspace(0.2, 0.3, 6),
        }
    )
    document = analyse(study, n_boot=5).document
    assert document["params_law"]["status"] == "not_converged"
    assert document["params_law"]["alpha"] is None and document["params_law"]["ci"] is None
    assert document["data_law"]["status"] == "insufficient_data"
    assert document["status"] == "failed"


def test_points_file_nan_and_bad_columns(tmp_path):
    points = grid_points(sizes=4)
    points.loc[[0, 5, 9], "error"] = np.nan
    csv = tmp_path / "points.csv"
    points.to_csv(csv, index=False)
    cleaned = clean_points(read_points_file(csv), "final")
    assert cleaned.dropped_nan == 3
    assert len(cleaned.table) == 16  # one final epoch per run
    points.drop(columns="compute_flops").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(MlpscaleError, match="missing column.*compute_flops"):
        read_points_file(tmp_path / "bad.csv")
    with pytest.raises(MlpscaleError, match="unknown file type"):
        read_points_file(csv.rename(tmp_path / "points.txt"))
    with pytest.raises(MlpscaleError, match="exactly one source"):
        run_scaling_fit(FitOptions())


def test_cli_points_file_prediction_and_user_error(tmp_path, capsys):
    from importlib import util

    from mlpscale.paths import repo_root

    spec = util.spec_from_file_location("fit_job", repo_root() / "jobs" / "fit_scaling_laws.py")
    job = util.module_from_spec(spec)
    spec.loader.exec_module(job)
    parquet = tmp_path / "points.parquet"
    grid_points(sizes=4).to_parquet(parquet)
    out = tmp_path / "out"
    assert (
        job.main(
            [
                "--points",
                str(parquet),
                "--out",
                str(out),
                "--bootstrap",
                "10",
                "--no-mlflow",
                "--predict-compute",
                "1e17",
            ]
        )
        == 0
    )
    document = json.loads((out / "fit.json").read_text())
    prediction = document["prediction"]
    assert prediction["compute_flops"] == 1e17
    parametric = prediction["parametric"]
    assert parametric["num_params"] * parametric["n_train"] * 3 * parametric["epochs"] == pytest.approx(1e17)
    assert 0 < prediction["error_compute_law"] < 1
    assert job.main(["--points", str(tmp_path / "missing.csv"), "--no-mlflow"]) == 2
    assert "no such file" in capsys.readouterr().err


def _log_study(uri: str, experiment: str) -> dict:
    """Runs logged by hand with the design.md run record: a 4 x 4 grid, 3 epochs, plus two bad runs."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment)
    sweep = client.create_run(experiment_id, run_name="sweep", tags={"mlpscale.job": "sweep"}).info.run_id
    rng = np.random.default_rng(3)
    study_law = {**TRUE, "B": 4.0}  # errors stay below 1 (val_top1 > 0)
    logged = {}
    for width in (32, 64, 128, 256):
        for n_train in (1000, 4000, 16000, 64000):
            num_params, flops = 1000 * width**2, 990 * width**2
            run = client.create_run(
                experiment_id,
                run_name=f"B_2-Wi_{width}-n{n_train}",
                tags={"mlpscale.job": "trial", "mlpscale.sweep_id": sweep, "mlflow.parentRunId": sweep},
            )
            params = {
                "arch": f"B_2-Wi_{width}",
                "num_params": num_params,
                "forward_flops": flops,
                "n_train": n_train,
                "epochs": 3,
                "schedule": "none",
                "dataset": "synthetic",
            }
            metrics = []
            for epoch in (1, 2, 3):
                error = (joint_law(num_params, n_train, **study_law) + 0.2 / epoch) * np.exp(rng.normal(0, NOISE))
                metrics += [
                    Metric("val_top1", 1 - error, 0, epoch),
                    Metric("compute_flops", 3.0 * flops * n_train * epoch, 0, epoch),
                ]
            client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
            client.set_terminated(run.info.run_id)
            logged[run.info.run_id] = 3
    no_params = client.create_run(experiment_id, run_name="no-params", tags={"mlpscale.job": "pretrain"})
    client.log_metric(no_params.info.run_id, "val_top1", 0.5, step=1)
    cosine = client.create_run(experiment_id, run_name="cosine-nan", tags={"mlpscale.job": "pretrain"})
    client.log_batch(
        cosine.info.run_id,
        params=[
            Param("num_params", "5e6"),
            Param("forward_flops", "5e6"),
            Param("n_train", "1000"),
            Param("schedule", "cosine"),
        ],
        metrics=[Metric("val_top1", float("nan"), 0, 1), Metric("val_top1", 0.05, 0, 2)],
    )
    return {"grid": logged, "no_params": no_params.info.run_id, "sweep": sweep, "experiment_id": experiment_id}


@pytest.mark.integration
def test_fit_job_end_to_end_from_mlflow(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    study = _log_study(tracking_uri, "study")
    out = tmp_path / "fit"
    outcome = run_scaling_fit(FitOptions(experiment="study", out=str(out), bootstrap=20, seed=1))
    document = json.loads((out / "fit.json").read_text())
    assert set(document) >= {
        "compute_law",
        "params_law",
        "data_law",
        "allocation",
        "goodness_of_fit",
        "counts",
        "status",
        "warnings",
        "skipped_runs",
    }
    for law, keys in (
        ("compute_law", {"a", "b", "alpha", "e_inf", "ci"}),
        ("params_law", {"a", "alpha", "e_inf", "ci"}),
        ("data_law", {"a", "alpha", "e_inf", "ci"}),
    ):
        assert set(document[law]) >= keys | {"status"}
        assert document[law]["status"] == "ok", document[law]["message"]
        low, high = document[law]["ci"]["alpha"]
        assert low <= document[law]["alpha"] <= high
    for method in ("frontier", "parametric"):
        entry = document["allocation"][method]
        assert set(entry) >= {"params_exponent", "data_exponent", "method", "ci"} and entry["method"] == method
        assert entry["status"] == "ok", entry["message"]
    # the 16 grid runs (3 epochs each) and the cosine run's one finite epoch; NaN counted; no-params run skipped
    assert document["counts"]["runs"] == 17 and document["counts"]["points"] == 16 * 3 + 1
    assert document["counts"]["dropped_nan"] == 1
    assert [s["run_id"] for s in document["skipped_runs"]] == [study["no_params"]]
    assert any("non-constant learning-rate schedule" in w for w in document["warnings"])
    table = pd.read_parquet(out / "points.parquet")
    assert set(table["run_id"]) >= set(study["grid"])
    assert (table["error"] > 0).all() and (table["compute_flops"] > 0).all()
    for name in ("compute", "bottlenecks", "allocation"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0 and (out / "plots" / f"{name}.svg").exists()

    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["mlpscale.job"] == "scaling_fit"
    assert run.data.tags["mlpscale.source_experiment"] == study["experiment_id"]
    assert run.info.experiment_id == study["experiment_id"] and run.info.status == "FINISHED"
    assert run.data.metrics["compute_law.alpha"] == pytest.approx(document["compute_law"]["alpha"])
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"fit.json", "points.parquet", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(outcome.run_id, "plots")} >= {
        "plots/compute.png",
        "plots/compute.svg",
    }

    # the same study read as a sweep, final epochs only: the fit run of the first call is not a point
    by_sweep = run_scaling_fit(
        FitOptions(sweep=study["sweep"], epochs="final", out=str(tmp_path / "sweep"), bootstrap=0, log_mlflow=False)
    )
    assert by_sweep.document["counts"]["runs"] == 16 and by_sweep.document["counts"]["points"] == 16
    with pytest.raises(MlpscaleError, match="no such experiment"):
        run_scaling_fit(FitOptions(experiment="nope", out=str(tmp_path / "x")))
