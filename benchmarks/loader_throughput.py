"""Loader throughput: mlpscale's FFCV training pipeline against a torch DataLoader doing the same work.

Both read the same uint8 images (random pixels, held in a NumPy array for the baseline and written
raw to a .beton for FFCV) and produce the same batches: random resized crop (scale 0.08-1, ratio
3/4-4/3) to R x R, horizontal flip, float normalisation and MixUp (alpha 0.8) on the device (CPU
here). The baseline is a typical map-style Dataset: per-sample crop parameters as torchvision
draws them, the crop resized with Pillow (what torchvision does; `--baseline cv2` uses OpenCV's
INTER_AREA, FFCV's own resize kernel), default collation, `--workers` worker processes. Its tail
(normalise + MixUp) is either torch ops as a PyTorch user writes them (`--tail torch`) or the same
fused uint8 pass mlpscale's CPU loader runs (`--tail fused`), which isolates what the loader itself buys.
The baseline's worker processes work ahead of the consumer; mlpscale's CPU loader makes each batch
when asked (docs/loaders.md), and is also measured making them ahead in FFCV's prefetch thread
(its default off the CPU).

One untimed warm-up epoch each (numba compile, worker start), then `--epochs` rounds in which every
loader runs one timed epoch in turn, so a drifting machine slows all of them alike; the figure is
the median epoch. Prints a markdown table; `--out FILE` also writes the figures as JSON.

    python benchmarks/loader_throughput.py --images 20000 --resolutions 32 64 --workers 2 --epochs 5 --batch-size 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlpscale.data.augment import normalization_affine
from mlpscale.data.loaders import train_loader
from mlpscale.data.mixup import MixUp

SCALE, RATIO, MIXUP_ALPHA = (0.08, 1.0), (3 / 4, 4 / 3), 0.8
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def random_crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, height, width


class CropFlipDataset(Dataset):
    """uint8 HWC images in memory -> random resized crop + flip -> uint8 CHW tensor, one sample at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, resolution: int, resize: str) -> None:
        self.images, self.labels, self.resolution, self.resize = images, labels, resolution, resize
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        top, left, h, w = random_crop_box(image.shape[0], image.shape[1], self.rng)
        crop = image[top : top + h, left : left + w]
        size = (self.resolution, self.resolution)
        if self.resize == "pil":
            from PIL import Image

            out = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))
        else:
            import cv2

            out = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_AREA)
        if self.rng.random() < 0.5:
            out = out[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), int(self.labels[index])


def _seed_worker(worker_id: int) -> None:
    torch.utils.data.get_worker_info().dataset.rng = random.Random(worker_id + 1)


def baseline_batches(loader: DataLoader, mixup: MixUp, tail: str):
    """The tail after the DataLoader: `torch` as a PyTorch user writes it (float, normalise, index_select +
    lerp_ MixUp), or `fused`: mlpscale's own one-pass uint8 normalise-and-mix, to isolate the loader's share."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    scale, shift = normalization_affine(MEAN, STD)
    for images, labels in loader:
        if tail == "fused":
            yield mixup.normalize_and_mix(images, labels, scale, shift)
        else:
            yield mixup(images.float().sub_(mean).div_(std), labels)


def one_epoch(batches) -> tuple[int, float]:
    """(images, seconds) of one pass."""
    seen, start = 0, time.perf_counter()
    for batch in batches:
        seen += batch[0].shape[0]
    return seen, time.perf_counter() - start


def measure(resolution: int, args, workdir: Path) -> list[dict]:
    """Warm every loader up, then time them in turn, one epoch each, `--epochs` rounds (drift hits all alike)."""
    rng = np.random.default_rng(resolution)
    images = rng.integers(0, 256, size=(args.images, resolution, resolution, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.images)
    beton = workdir / f"bench_{resolution}.beton"
    _write_beton(beton, images, labels)

    ffcv, ahead = (
        train_loader(
            beton,
            batch_size=args.batch_size,
            resolution=resolution,
            mean=MEAN,
            std=STD,
            device="cpu",
            num_workers=args.workers,
            scale=SCALE,
            ratio=RATIO,
            mixup_alpha=MIXUP_ALPHA,
            seed=0,
        )
        for _ in range(2)
    )
    ahead.prefetch = True
    loaders = {"ffcv (mlpscale)": lambda: iter(ffcv), "ffcv (mlpscale), prefetch thread": lambda: iter(ahead)}
    for resize in args.baseline:
        dataset = CropFlipDataset(images, labels, resolution, resize)
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(0),
        )
        for tail in args.tail:
            mixup = MixUp(MIXUP_ALPHA, seed=0)
            name = f"torch DataLoader ({resize} resize, {tail} tail)"
            loaders[name] = lambda loader=loader, mixup=mixup, tail=tail: baseline_batches(loader, mixup, tail)
    warmup = {name: one_epoch(make())[1] for name, make in loaders.items()}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.epochs):
        for name, make in loaders.items():
            seen, seconds = one_epoch(make())
            rates[name].append(seen / seconds)
    rows = [
        dict(
            resolution=resolution,
            loader=name,
            images_per_s=statistics.median(rates[name]),
            per_epoch=[round(r) for r in rates[name]],
            warmup_s=warmup[name],
        )
        for name in loaders
    ]
    for row in rows:
        row["ffcv_speedup"] = rows[0]["images_per_s"] / row["images_per_s"]
    return rows


def _write_beton(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Arrays:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(Arrays())


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} logical CPUs, {model}, torch {torch.__version__}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| resolution | loader | images/s (median epoch) | epochs min-max | FFCV speed-up | warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['resolution']} | {row['loader']} | {row['images_per_s']:,.0f} | "
            f"{min(row['per_epoch']):,}-{max(row['per_epoch']):,} | "
            f"{row['ffcv_speedup']:.1f}x | {row['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs (rounds) after one warm-up epoch")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--baseline", nargs="+", choices=["pil", "cv2"], default=["pil", "cv2"])
    parser.add_argument(
        "--tail",
        nargs="+",
        choices=["torch", "fused"],
        default=["torch", "fused"],
        help="the baseline's normalise + MixUp: torch ops, or mlpscale's fused CPU pass",
    )
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        rows = [row for r in args.resolutions for row in measure(r, args, Path(tmp))]
    print(f"Machine: {machine()}")
    print(f"Command: python {' '.join(sys.argv)}\n")
    print(markdown(rows))
    if args.out:
        args.out.write_text(
            json.dumps({"machine": machine(), "args": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
