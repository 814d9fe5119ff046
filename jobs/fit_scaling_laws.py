"""Fit the scaling laws of a study: python jobs/fit_scaling_laws.py --experiment NAME [--out DIR] ...

Reads the runs of an MLflow experiment (or a sweep, or a points file), fits the compute law on the
compute-optimal frontier, the parameter- and data-bottlenecked laws and the compute-optimal allocation,
and writes fit.json, points.parquet and plots to --out and to an MLflow run. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json

from mlpscale.cli import PLAIN_LOGS, job_main
from mlpscale.scaling.job import FitOptions, run_scaling_fit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="MLflow experiment name or id whose runs are the study")
    source.add_argument("--sweep", help="sweep id (tag mlpscale.sweep_id, or the sweep's parent run id)")
    source.add_argument("--points", help="CSV or Parquet with run_id,num_params,n_train,epoch,compute_flops,error")
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlflow.db at the repo root)"
    )
    parser.add_argument(
        "--metric",
        default="val_top1",
        help="metric giving the error: accuracies as 1 - value, *loss*/*err* as is (default val_top1)",
    )
    parser.add_argument(
        "--epochs",
        choices=("all", "final"),
        default="all",
        help="every logged epoch is a point (constant LR schedule) or only each run's final one",
    )
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates resampling runs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--predict-compute", type=float, help="a compute budget C in FLOPs: recommended P, N, error")
    parser.add_argument(
        "--allocation-epoch", type=int, help="the fixed T for the allocation fits (default: each run's final epoch)"
    )
    parser.add_argument(
        "--jobs",
        default="pretrain,trial",
        help="comma-separated mlpscale.job tags whose runs are read (untagged runs are read too)",
    )
    parser.add_argument("--out", help="output folder (default outputs/scaling-fit at the repo root)")
    parser.add_argument(
        "--fit-experiment",
        help="experiment for the fit's own run (default: the source's, or scaling-fits for --points)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="write --out only, log no MLflow run")
    return parser.parse_args(argv)


@job_main(PLAIN_LOGS)
def main(argv=None) -> int:
    args = parse_args(argv)
    outcome = run_scaling_fit(
        FitOptions(
            experiment=args.experiment,
            sweep=args.sweep,
            points=args.points,
            tracking_uri=args.tracking_uri,
            metric=args.metric,
            epochs=args.epochs,
            bootstrap=args.bootstrap,
            seed=args.seed,
            predict_compute=args.predict_compute,
            allocation_epoch=args.allocation_epoch,
            jobs=tuple(j.strip() for j in args.jobs.split(",") if j.strip()),
            out=args.out,
            fit_experiment=args.fit_experiment,
            log_mlflow=not args.no_mlflow,
        )
    )
    document = outcome.document
    summary = {
        "status": document["status"],
        "out": str(outcome.out_dir),
        "mlflow_run": outcome.run_id,
        "counts": document["counts"],
    }
    for law in ("compute_law", "params_law", "data_law"):
        summary[law] = {
            "status": document[law]["status"],
            "alpha": document[law]["alpha"],
            "e_inf": document[law]["e_inf"],
        }
    for method in ("frontier", "parametric"):
        entry = document["allocation"][method]
        summary[f"allocation_{method}"] = {
            "status": entry["status"],
            "p": entry["params_exponent"],
            "n": entry["data_exponent"],
        }
    if document.get("prediction"):
        summary["prediction"] = document["prediction"]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
