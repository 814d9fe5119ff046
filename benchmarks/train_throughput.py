"""Training throughput: the whole Ray Train pretraining job against the same model stepping on in-memory tensors.

The upper bound: model, LION optimizer and precision exactly as the job sets them up, stepping on
one normalised float batch already in memory (no loader, no Ray). The job: `run_pretraining` on a
synthetic .beton of random pixels (`--images` training images, random labels) with the same
batch, crops, flips and MixUp off; its `throughput_img_s` metric (training images per second of
the training phase, evaluation excluded) is read back from MLflow and the median over epochs 2..T
is compared with the bound (epoch 1 includes numba compilation and worker start).

    python benchmarks/train_throughput.py --arch B_6-Wi_256 --resolution 32 --batch-size 512
    # GPU, against the paper's RTX A5000 (ImageNet-21k, ~12M images/epoch in ~250 s / ~450 s: ~48k / ~27k img/s)
    python benchmarks/train_throughput.py --device cuda --arch B_6-Wi_1024 --resolution 64 --batch-size 16384 \
        --images 200000 --classes 11230
    python benchmarks/train_throughput.py --device cuda --arch B_12-Wi_1024 --resolution 64 --batch-size 16384 \
        --images 200000 --classes 11230
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlpscale import tracking
from mlpscale.config import load_config
from mlpscale.data.beton import write_beton
from mlpscale.data.meta import write_meta
from mlpscale.models import build_model
from mlpscale.train.losses import mixup_cross_entropy
from mlpscale.train.optim import build_optimizer
from mlpscale.train.precision import autocast, enable_fast_matmul, resolve_precision
from mlpscale.train.pretrain import run_pretraining

DATASET = "synthetic"


def make_dataset(root: Path, *, images: int, test_images: int, resolution: int, classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    directory = root / DATASET / f"res{resolution}"
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", images), ("test", test_images)):
        pixels = rng.integers(0, 256, size=(n, resolution, resolution, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n)
        write_beton(directory / f"{split}.beton", pixels, labels)
        counts[split] = n
    write_meta(directory, {"dataset": DATASET, "num_classes": classes, "classes": [str(i) for i in range(classes)],
                           "counts": counts, "mean": [127.5] * 3, "std": [73.9] * 3, "resolution": resolution,
                           "skipped": [], "subsets": []})
    return directory


def in_memory_bound(args, device: torch.device, steps: int) -> float:
    """img/s of forward + loss + backward + optimizer step on one batch already on the device."""
    enable_fast_matmul(device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())  # as the job's one worker (all CPUs); importing ffcv set it to 1
    precision = resolve_precision(args.precision, device)
    model = build_model(args.arch, resolution=args.resolution, num_classes=args.classes).to(device)
    optimizer = build_optimizer(model, "lion", lr=1e-5)
    micro = args.batch_size // args.accumulation_steps
    images = torch.randn(micro, 3, args.resolution, args.resolution, device=device)
    labels = torch.randint(0, args.classes, (micro,), device=device)

    def step():
        for _ in range(args.accumulation_steps):
            with autocast(device, precision):
                loss = mixup_cross_entropy(model(images).float(), labels)
            (loss / args.accumulation_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * args.batch_size / (time.perf_counter() - start)


def job_throughput(args, root: Path) -> tuple[list[float], float]:
    import ray

    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(overrides={
        "arch": args.arch, "dataset": DATASET, "data_dir": str(root), "resolution": args.resolution,
        "epochs": args.epochs, "batch_size": args.batch_size, "accumulation_steps": args.accumulation_steps,
        "lr": 1e-5, "schedule": "none", "crop_scale": [0.08, 1.0], "flip": True, "precision": args.precision,
        "loader_workers": args.loader_workers, "tracking_uri": uri, "storage_path": str(root / "ray"),
        "experiment": "train-throughput", "checkpoint_every": args.epochs, "use_gpu": args.device == "cuda"})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        start = time.perf_counter()
        result = run_pretraining(cfg)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    history = tracking.client(uri).get_metric_history(result.run_id, "throughput_img_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)], wall


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="B_6-Wi_256")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--bound-steps", type=int, default=40)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--loader-workers", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, images=args.images, test_images=args.test_images, resolution=args.resolution,
                     classes=args.classes)
        # the bound before and after the job: on a shared machine the load drifts
        bound_before = in_memory_bound(args, device, args.bound_steps)
        per_epoch, wall = job_throughput(args, root)
        bound_after = in_memory_bound(args, device, args.bound_steps)
    bound = (bound_before + bound_after) / 2
    steady = per_epoch[1:] or per_epoch
    job = statistics.median(steady)
    figures = {
        "arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
        "precision": resolve_precision(args.precision, device), "device": torch.cuda.get_device_name(0)
        if device.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)",
        "bound_img_s": round(bound), "bound_before_after_img_s": [round(bound_before), round(bound_after)],
        "job_img_s_per_epoch": [round(v) for v in per_epoch],
        "job_img_s": round(job), "ratio": round(job / bound, 3), "job_wall_s": round(wall, 1),
        "command": "python benchmarks/train_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
    }
    print("| model | res | batch | precision | device | in-memory bound img/s | job img/s (median, epochs 2..T) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.arch} | {args.resolution} | {args.batch_size} | {figures['precision']} | {figures['device']} "
          f"| {figures['bound_img_s']} | {figures['job_img_s']} | {figures['ratio']} |")
    print(json.dumps(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
