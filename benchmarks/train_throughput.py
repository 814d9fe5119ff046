"""Training throughput: the whole Ray Train pretraining job against the same model stepping on in-memory tensors.

Four measurements of the same model, LION optimizer, precision and batch, on a synthetic .beton
of random pixels (`--images` training images, random labels), crops and flips on, MixUp off:

- bound: the step on one normalised float batch already in memory (no loader, no Ray), measured
  before, between and after the others; each of them is compared with the mean of the two bounds
  measured right before and right after it (a shared machine drifts by +-10% within minutes);
- loader loop: the job's own `train_epoch` fed by the job's FFCV train loader, in this process
  (no Ray): what the loader costs the step;
- Ray Train bound: the bound's step, run inside a Ray Train worker on a Ray instance started as the
  job starts it: what Ray Train's control plane (its actors and daemons) costs the step, no loader;
  beside it, the cores the training worker process used and the cores everything else on the
  machine used meanwhile (/proc/stat): on a CPU machine the second caps the first;
- job: `run_pretraining` as `jobs/pretrain.py` runs it (Ray Train worker, MLflow, Ray started or
  joined as the job does); its `throughput_img_s` metric (training phase of each epoch, evaluation
  excluded) read back from MLflow.

Loop and job report the median over epochs 2..T (epoch 1 includes numba compilation and worker
start). `--rounds R` repeats it all R times and reports every round and the median ratios.

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
from mlpscale.data.host_memory import keep_freed_memory
from mlpscale.data.meta import write_meta
from mlpscale.models import build_model
from mlpscale.train.losses import mixup_cross_entropy
from mlpscale.train.optim import build_optimizer
from mlpscale.train.precision import autocast, enable_fast_matmul, resolve_precision
from mlpscale.train.pretrain import run_pretraining
from mlpscale.train.schedule import build_scheduler
from mlpscale.train.steps import train_epoch

DATASET = "synthetic"
CROP_SCALE = (0.08, 1.0)


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
    write_meta(
        directory,
        {
            "dataset": DATASET,
            "num_classes": classes,
            "classes": [str(i) for i in range(classes)],
            "counts": counts,
            "mean": [127.5] * 3,
            "std": [73.9] * 3,
            "resolution": resolution,
            "skipped": [],
            "subsets": [],
        },
    )
    return directory


def _setup(args, device: torch.device):
    """Model, optimizer and precision exactly as the job's one worker builds them."""
    enable_fast_matmul(device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())  # as the job's one worker: all CPUs
        keep_freed_memory()  # as the job's CPU loader does: without it every step page-faults its activations
    precision = resolve_precision(args.precision, device)
    model = build_model(args.arch, resolution=args.resolution, num_classes=args.classes).to(device)
    return model, build_optimizer(model, "lion", lr=1e-5), precision


def machine_busy_s() -> float:
    """CPU seconds all cores of this machine have been busy since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def with_cores(measure) -> tuple[float, float, float]:
    """measure()'s value, the cores this process used meanwhile, and the cores all other processes used.

    On a GPU the memory measure() reserved goes back to the device, for the Ray worker that uses it next."""
    wall, own, busy = time.perf_counter(), time.process_time(), machine_busy_s()
    value = measure()
    wall, own, busy = time.perf_counter() - wall, time.process_time() - own, machine_busy_s() - busy
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return value, own / wall, max(busy - own, 0.0) / wall


def wait_until_quiet(limit_s: float = 30.0, other_cores: float = 0.05) -> None:
    """Wait (at most limit_s) until the rest of the machine uses under other_cores, e.g. a Ray shutting down."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and with_cores(lambda: time.sleep(1.0))[2] >= other_cores:
        pass


def in_memory_bound(args, device: torch.device, steps: int) -> float:
    """img/s of forward + loss + backward + optimizer step on one batch already on the device."""
    model, optimizer, precision = _setup(args, device)
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


def loader_loop_throughput(args, device: torch.device, root: Path) -> list[float]:
    """img/s per epoch of the job's train_epoch on the job's FFCV train loader, in this process (no Ray)."""
    from mlpscale.data.loaders import default_threads, train_loader
    from mlpscale.data.meta import load_meta

    model, optimizer, precision = _setup(args, device)
    scheduler = build_scheduler(optimizer, "none", total_steps=1, warmup_steps=0)
    directory = root / DATASET / f"res{args.resolution}"
    meta = load_meta(directory)
    loader = train_loader(
        directory / "train.beton",
        batch_size=args.batch_size // args.accumulation_steps,
        resolution=args.resolution,
        mean=meta["mean"],
        std=meta["std"],
        device=device,
        scale=CROP_SCALE,
        flip=True,
        num_workers=args.loader_workers or default_threads(device, os.cpu_count()),
    )
    if args.prefetch:
        loader.prefetch = True
    return [
        train_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            device=device,
            precision=precision,
            accumulation_steps=args.accumulation_steps,
        ).throughput_img_s
        for _ in range(args.epochs)
    ]


def ray_train_bound(args) -> tuple[float, float, float]:
    """The in-memory bound inside a one-worker Ray Train job (no loader, no MLflow): `--epochs` windows of
    `--bound-steps` steps; img/s, the worker's cores and the other processes' cores, each the median of
    windows 2..T."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mlpscale.ray_cluster import ensure_ray

    def measure(config):  # imports this file as a module: Ray cannot pickle its functions from __main__
        import sys

        import ray.train
        import torch

        from mlpscale.train.loop import drop_single_worker_process_group

        sys.path.insert(0, config["directory"])
        from train_throughput import in_memory_bound, with_cores

        drop_single_worker_process_group(ray.train.get_context().get_world_size())
        args = config["args"]
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
        return [with_cores(lambda: in_memory_bound(args, device, args.bound_steps)) for _ in range(args.epochs)]

    ensure_ray()
    try:
        cpus, use_gpu = int(ray.cluster_resources().get("CPU", 1)), args.device == "cuda"
        resources = {"CPU": min(cpus, 8), "GPU": 1} if use_gpu else {"CPU": cpus}  # as the job's one worker
        trainer = TorchTrainer(
            measure,
            train_loop_config={"args": args, "directory": str(Path(__file__).parent)},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"ray-train-bound-{time.time_ns()}", storage_path=tempfile.mkdtemp(prefix="ray-bound-")
            ),
        )
        windows = trainer.fit().return_value  # like the job: Ray's own start-up load passes in window 1
        return tuple(_steady(list(column)) for column in zip(*windows))
    finally:
        ray.shutdown()


def job_throughput(args, root: Path) -> tuple[list[float], float]:
    import ray

    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        overrides={
            "arch": args.arch,
            "dataset": DATASET,
            "data_dir": str(root),
            "resolution": args.resolution,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "accumulation_steps": args.accumulation_steps,
            "lr": 1e-5,
            "schedule": "none",
            "crop_scale": list(CROP_SCALE),
            "flip": True,
            "precision": args.precision,
            "loader_workers": args.loader_workers,
            "tracking_uri": uri,
            "storage_path": str(root / "ray"),
            "experiment": "train-throughput",
            "checkpoint_every": args.epochs,
            "use_gpu": args.device == "cuda",
        }
    )
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


def one_round(args, device: torch.device, root: Path) -> dict:
    """bound, job, bound, loader loop, bound, Ray Train bound, bound: each phase against the mean of the
    two bounds around it (the machine drifts by +-10% within minutes)."""
    bounds = [with_cores(lambda: in_memory_bound(args, device, args.bound_steps))]
    job, wall = job_throughput(args, root)
    wait_until_quiet()  # Ray's processes take seconds to exit after ray.shutdown()
    bounds.append(with_cores(lambda: in_memory_bound(args, device, args.bound_steps)))
    loop = with_cores(lambda: loader_loop_throughput(args, device, root))[0]
    bounds.append(with_cores(lambda: in_memory_bound(args, device, args.bound_steps)))
    ray_bound, worker_cores, other_cores = ray_train_bound(args)
    wait_until_quiet()
    bounds.append(with_cores(lambda: in_memory_bound(args, device, args.bound_steps)))
    bound_img_s = [img_s for img_s, _, _ in bounds]
    phases = {"job": _steady(job), "loop": _steady(loop), "ray_train_bound": ray_bound}
    figures = {
        "bounds_img_s": [round(b) for b in bound_img_s],
        "job_img_s_per_epoch": [round(v) for v in job],
        "loop_img_s_per_epoch": [round(v) for v in loop],
        "job_wall_s": round(wall, 1),
        "bound_cores": [round(own, 2) for _, own, _ in bounds],
        "bound_other_cores": [round(other, 3) for _, _, other in bounds],
        "ray_train_worker_cores": round(worker_cores, 2),
        "ray_train_other_cores": round(other_cores, 3),
    }
    for index, (name, img_s) in enumerate(phases.items()):
        figures[f"{name}_img_s"] = round(img_s)
        figures[f"{name}_ratio"] = round(img_s / statistics.mean(bound_img_s[index : index + 2]), 3)
    return figures


def _steady(per_epoch: list[float]) -> float:
    """The median over epochs 2..T (epoch 1 compiles the pipeline)."""
    return statistics.median(per_epoch[1:] or per_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="B_6-Wi_256")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--bound-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1, help="repeat bound / job / bound / loop / bound / ...")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--loader-workers", type=int, default=None, help="decoder threads (default: the job's own)")
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="loader loop with FFCV's prefetch thread (the job's loader has it off the CPU only)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(
            root, images=args.images, test_images=args.test_images, resolution=args.resolution, classes=args.classes
        )
        rounds = [one_round(args, device, root) for _ in range(args.rounds)]
    figures = {
        "arch": args.arch,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": resolve_precision(args.precision, device),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)",
        "rounds": rounds,
        "loop_ratio_median": statistics.median(r["loop_ratio"] for r in rounds),
        "ray_train_bound_ratio_median": statistics.median(r["ray_train_bound_ratio"] for r in rounds),
        "job_ratio_median": statistics.median(r["job_ratio"] for r in rounds),
        "ray_train_other_cores_median": statistics.median(r["ray_train_other_cores"] for r in rounds),
        "command": "python benchmarks/train_throughput.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v not in (None, False) and k != "out"
        ),
    }
    print(
        "| round | model | res | batch | precision | bounds img/s | job img/s (ratio) "
        "| loader loop img/s (ratio) | Ray Train bound img/s (ratio) | cores: Ray Train worker / all others |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, r in enumerate(rounds, 1):
        print(
            f"| {index} | {args.arch} | {args.resolution} | {args.batch_size} | {figures['precision']} "
            f"| {' / '.join(f'{b:,}' for b in r['bounds_img_s'])} | {r['job_img_s']:,} ({r['job_ratio']:.2f}) "
            f"| {r['loop_img_s']:,} ({r['loop_ratio']:.2f}) "
            f"| {r['ray_train_bound_img_s']:,} ({r['ray_train_bound_ratio']:.2f}) "
            f"| {r['ray_train_worker_cores']:.2f} / {r['ray_train_other_cores']:.2f} |"
        )
    print(
        f"median ratios: job {figures['job_ratio_median']:.2f}, loader loop {figures['loop_ratio_median']:.2f}, "
        f"Ray Train bound {figures['ray_train_bound_ratio_median']:.2f}; cores the rest of the machine used "
        f"beside the Ray Train worker: {figures['ray_train_other_cores_median']:.2f} of {os.cpu_count()}"
    )
    print(json.dumps(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
