"""Convert a dataset source to FFCV .beton files: `python jobs/prepare_data.py DATASET [--source PATH] ...`."""

from __future__ import annotations

import argparse

from mlpscale.cli import PLAIN_LOGS, job_main
from mlpscale.data.meta import load_meta
from mlpscale.data.prepare import prepare_dataset
from mlpscale.data.sources import READERS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", choices=sorted(READERS), help="source format (digits needs no --source)")
    parser.add_argument("--source", help="archive, folder or file tree holding the source dataset")
    parser.add_argument("--data-dir", help="dataset root (default: $MLPSCALE_DATA or data/ at the repo root)")
    parser.add_argument("--resolution", type=int, help="side length R of the stored images (default per dataset)")
    parser.add_argument(
        "--n-train",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also write the nested class-proportional subset train_n<N>.beton (repeatable)",
    )
    parser.add_argument("--strict", action="store_true", help="stop at an undecodable image instead of skipping it")
    parser.add_argument("--jpeg", action="store_true", default=None, help="store JPEG instead of raw pixels")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if the files exist")
    parser.add_argument(
        "--name", help="store under this dataset name instead of DATASET (e.g. stl10 for a folder tree)"
    )
    return parser.parse_args(argv)


@job_main(PLAIN_LOGS)
def main(argv=None) -> int:
    args = parse_args(argv)
    directory = prepare_dataset(
        args.dataset,
        source=args.source,
        data_dir=args.data_dir,
        resolution=args.resolution,
        n_train=args.n_train,
        strict=args.strict,
        jpeg=args.jpeg,
        overwrite=args.overwrite,
        name=args.name,
    )
    meta = load_meta(directory)
    print(f"{meta['dataset']} at {meta['resolution']} px in {directory}")
    for split, count in meta["counts"].items():
        print(f"  {split}.beton: {count} images")
    print(
        f"  classes: {meta['num_classes']}; skipped: {len(meta['skipped'])}; mean {[round(m, 2) for m in meta['mean']]}"
        f" std {[round(s, 2) for s in meta['std']]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
