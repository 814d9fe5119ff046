"""Run a scaling grid: every (architecture, subset size) pair one trial of a Ray Tune grid sweep.

    python jobs/scaling_grid.py --archs B_6-Wi_256,B_12-Wi_256 --n-train 10000,100000 --epochs 50 [pretrain options]
    python jobs/scaling_grid.py --preset cpu-demo            # 16 tiny trials on digits, minutes on 2 cores
    python jobs/scaling_grid.py --resume --name <grid>       # continue a grid whose driver was stopped
Then: python jobs/fit_scaling_laws.py --sweep <grid name>. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import sys

from mlpscale.cli import job_main
from mlpscale.config import add_config_arguments, user_overrides


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve"
    )
    add_config_arguments(parser)  # every pretrain field as --field-name (e.g. --epochs, --dataset, --experiment)
    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--preset",
        choices=("paper", "cpu-demo"),
        help="paper: Table 3 models on ImageNet-21k subsets (appendix A.4 recipe); cpu-demo: tiny "
        "models on digits subsets",
    )
    grid.add_argument("--archs", help="comma-separated architectures, e.g. B_6-Wi_256,B_12-Wi_256")
    grid.add_argument(
        "--n-train", "--n_train", dest="n_train_list", help="comma-separated training-subset sizes, e.g. 10000,100000"
    )
    grid.add_argument("--name", help="sweep id / experiment folder (default scaling-grid-<time>)")
    grid.add_argument("--max-concurrent", type=int, help="trials at a time (default one per GPU, or per CPU)")
    grid.add_argument("--resume", action="store_true", help="continue the grid named by --name")
    return parser.parse_args(argv)


@job_main()
def main(argv=None) -> int:
    args = parse_args(argv)
    from mlpscale.scaling.grid import plan_grid, run_scaling_grid
    from mlpscale.tune import report

    overrides = user_overrides(args)  # --config file and pretrain options; --preset is the grid's
    storage_path = overrides.get("storage_path")
    plan = (
        None
        if args.resume
        else plan_grid(preset=args.preset, archs=args.archs, n_train=args.n_train_list, overrides=overrides)
    )
    result = run_scaling_grid(
        plan, name=args.name, storage_path=storage_path, max_concurrent=args.max_concurrent, resume=args.resume
    )
    print(report.summary(result))
    print(f"grid {result.sweep_id}: fit it with  python jobs/fit_scaling_laws.py --sweep {result.sweep_id}")
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
