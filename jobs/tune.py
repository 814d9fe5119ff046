"""Search pretraining hyperparameters with Ray Tune + Optuna, tracked as nested MLflow runs.

python jobs/tune.py --space search_spaces/smoke.yaml --num-samples 8 [pretrain options]
python jobs/tune.py --resume --name <sweep> [--storage-path DIR]
"""

from __future__ import annotations

import argparse
import sys

from mlpscale.cli import job_main
from mlpscale.config import add_config_arguments, config_from_args
from mlpscale.errors import MlpscaleError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--space", help="search-space YAML (see search_spaces/README.md)")
    sweep.add_argument("--num-samples", type=int, default=8, help="trials to sample (times the grid points); default 8")
    sweep.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at a time; default one per GPU, or one per CPU without GPUs",
    )
    sweep.add_argument("--scheduler", default="none", help="asha (stop poor trials early) or none; default none")
    sweep.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    sweep.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/this at each rung")
    sweep.add_argument("--metric", default="val_top1", help="per-epoch metric to optimise; default val_top1")
    sweep.add_argument("--mode", default="max", help="max or min; default max")
    sweep.add_argument(
        "--lr-scaling", default="none", help="scale lr with batch_size/base batch: linear, sqrt or none; default none"
    )
    sweep.add_argument(
        "--base-batch-size",
        type=int,
        default=None,
        help="batch size the lr is given for (default: the pretrain batch_size)",
    )
    sweep.add_argument("--search-seed", type=int, default=0, help="seed of Optuna's TPE sampler; default 0")
    sweep.add_argument(
        "--trial-retries",
        type=int,
        default=2,
        help="restarts of a trial whose node or worker was lost (from its last checkpoint, same "
        "MLflow run); a NaN failure is final; default 2",
    )
    sweep.add_argument("--name", default=None, help="sweep id and experiment folder (default sweep-<time>)")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep named by --name (else the newest) after its driver was stopped",
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


@job_main()
def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.space and not args.resume:
        raise MlpscaleError("pass --space search_spaces/<file>.yaml (or --resume to continue a sweep)")
    from mlpscale.tune import report
    from mlpscale.tune.sweep import SweepOptions, run_sweep

    cfg = config_from_args(args)
    options = SweepOptions(
        space=args.space or "",
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        metric=args.metric,
        mode=args.mode,
        lr_scaling=args.lr_scaling,
        base_batch_size=args.base_batch_size,
        seed=args.search_seed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        name=args.name,
        storage_path=cfg.storage_path,
        trial_retries=args.trial_retries,
    )
    result = run_sweep(cfg, options, resume=args.resume)
    print(report.summary(result))
    return 0 if result.best_config_path is not None else 1


if __name__ == "__main__":
    sys.exit(main())
