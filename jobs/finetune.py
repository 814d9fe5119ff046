"""Fine-tune or linear-probe a pretrained MLP on a downstream dataset, tracked in MLflow.

python jobs/finetune.py --source RUN_ID|models:/name/version|name@alias|CHECKPOINT_DIR --dataset cifar10
                        --mode finetune|linear [--tta 100] [--real-labels real.json] [--grid lr_head=0.01,0.003]
"""

from __future__ import annotations

import argparse
import sys

from mlpscale.cli import job_main
from mlpscale.transfer.config import add_transfer_arguments, config_from_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_transfer_arguments(parser)
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="run a Ray Tune grid over these values (repeatable; pairs as 0.35,1.0;0.08,1.0)",
    )
    parser.add_argument("--storage-path", help="where Ray Tune keeps the grid's trial folders")
    return parser.parse_args(argv)


@job_main()
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    from mlpscale.transfer.run import parse_grid, run_transfer, run_transfer_grid

    if args.grid:
        parent_id, rows = run_transfer_grid(cfg, parse_grid(args.grid), storage_path=args.storage_path)
        for row in rows:
            print({key: row.get(key) for key in (*parse_grid(args.grid), "val_top1", "mlflow_run_id")})
        print(f"MLflow parent run: {parent_id} (experiment {cfg.experiment})")
        return 0
    result = run_transfer(cfg)
    for key in ("val_top1", "val_top1_tta", "val_real_top1"):
        if key in result.final_metrics:
            print(f"{key}: {result.final_metrics[key]:.4f}")
    print(f"MLflow run: {result.run_id} (experiment {cfg.experiment}), source run: {result.source_run_id}")
    print(f"model: {result.model_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
