"""Print an architecture's size, forward FLOPs, training compute and memory estimate as JSON.

    python jobs/model_info.py B_12-Wi_1024 --resolution 64 --num-classes 11230 \
        --n-train 1000000 --epochs 100 --batch-size 4096 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys

from mlpscale.cli import job_main
from mlpscale.models import NORMALIZATIONS, OPTIMIZER_STATE_BUFFERS, PRECISION_BYTES, model_info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", help="B_<depth>-Wi_<width> or S_<depth>-Wi_<width>")
    parser.add_argument("--resolution", type=int, required=True, help="image side in pixels")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--expansion", type=int, default=4, help="B-MLP expansion factor k")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="layer")
    parser.add_argument("--final-norm", action="store_true", help="a norm between the last block and the head")
    parser.add_argument("--n-train", type=int, help="training examples N (with --epochs: compute_flops)")
    parser.add_argument("--epochs", type=float, help="epochs T (with --n-train: compute_flops)")
    parser.add_argument("--batch-size", type=int, help="batch size for the memory estimate")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE_BUFFERS), default="lion")
    parser.add_argument("--precision", choices=tuple(PRECISION_BYTES), default="bf16")
    return parser.parse_args(argv)


@job_main(log_format=None)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = model_info(
        args.arch,
        resolution=args.resolution,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        expansion=args.expansion,
        normalization=args.normalization,
        final_norm=args.final_norm,
        n_train=args.n_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        precision=args.precision,
    )
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
