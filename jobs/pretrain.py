"""Pretrain an MLP as a Ray Train job tracked in MLflow.

python jobs/pretrain.py [--config f.yaml] [--key value ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from mlpscale.cli import job_main
from mlpscale.config import add_config_arguments, config_from_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate and print params, compute and memory as JSON")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run named by --run-name")
    return parser.parse_args(argv)


@job_main()
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.dry_run:
        from mlpscale.train.pretrain import dry_run

        print(json.dumps(dry_run(cfg), indent=2))
        return 0
    from mlpscale.train.pretrain import run_pretraining

    result = run_pretraining(cfg, resume=args.resume)
    top1 = result.final_metrics.get("val_top1")
    print(f"val top-1: {top1:.4f}" if top1 is not None else "val top-1: n/a")
    print(f"MLflow run: {result.run_id} (experiment {cfg.experiment}, id {result.experiment_id})")
    print(f"model: {result.model_uri}")
    print("see it with: make ui")
    return 0


if __name__ == "__main__":
    sys.exit(main())
