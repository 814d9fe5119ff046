"""The downstream training loop: fine-tuning (whole model, head and body learning rates) or linear probing.

finetune: a new head, every parameter trained; the optimizer gets the body's and the head's
parameters as separate groups (paper: SGD with momentum, 0.001 and 0.01).
linear: a new head on the frozen body (kept in eval mode); without augmentation the features of
both splits are computed once (features.py) and every epoch trains the head on them.
Epochs and evaluation are the shared ones (train/steps.py); a non-finite loss fails the run,
naming the learning rates.
Compute per epoch (FLOPs as multiply-accumulates, design.md): finetune 3*f*N; linear probe
f_body*N once for cached features (per epoch when augmenting) plus 3*f_head*N.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlpscale.data.loaders import eval_loader, train_loader
from mlpscale.errors import MlpscaleError
from mlpscale.models import model_stats
from mlpscale.train.optim import parameter_groups
from mlpscale.train.precision import enable_fast_matmul, resolve_precision
from mlpscale.train.schedule import build_scheduler
from mlpscale.train.steps import NonFiniteLoss, evaluate, train_epoch
from mlpscale.transfer.config import TransferConfig
from mlpscale.transfer.data import DownstreamData
from mlpscale.transfer.features import FeatureBatches, extract_features

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]


def pick_device(name: str = "auto") -> torch.device:
    """The device named (auto: a GPU when one is visible); a named GPU becomes this thread's current device,
    on which FFCV makes its CUDA streams and torch answers the bf16 question."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MlpscaleError(f"device={name!r} but no CUDA device is visible; use device=auto or cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def prepare_model(model: torch.nn.Module, num_classes: int, mode: str) -> torch.nn.Module:
    """A fresh head for the downstream classes; in linear mode the body is frozen."""
    model.reset_head(num_classes)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = mode == "finetune" or name.startswith("head.")
    return model


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    body = torch.nn.ModuleList([child for name, child in model.named_children() if name != "head"])
    return body, model.head


def build_transfer_optimizer(model: torch.nn.Module, cfg: TransferConfig) -> torch.optim.Optimizer:
    """Parameter groups (body at lr_body, head at lr_head; no weight decay on biases/norms), optimizer by name."""
    body, head = body_and_head(model)
    groups = []
    for module, lr in ((body, cfg.lr_body), (head, cfg.lr_head)):
        for group in parameter_groups(module, cfg.weight_decay):
            if group["params"]:
                groups.append({**group, "lr": lr})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=cfg.momentum)
    if cfg.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=cfg.lr_head)
    return torch.optim.AdamW(groups, lr=cfg.lr_head)


@dataclass
class TransferOutcome:
    model: torch.nn.Module
    metrics: dict[str, float]
    test_logits: torch.Tensor
    test_labels: torch.Tensor
    device: torch.device
    precision: str


class TransferTrainer:
    """Trains one downstream model; `fit(on_epoch)` calls back with each epoch's run-record metrics."""

    def __init__(self, cfg: TransferConfig, model: torch.nn.Module, data: DownstreamData):
        self.cfg, self.data = cfg, data
        self.device = pick_device(cfg.device)
        enable_fast_matmul(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        self.model = prepare_model(model, data.num_classes, cfg.mode).to(self.device)
        spec = model.config
        stats = model_stats(
            spec["arch"],
            resolution=data.resolution,
            num_classes=data.num_classes,
            in_channels=spec.get("in_channels", 3),
            expansion=spec.get("expansion", 4),
            normalization=spec.get("normalization", "layer"),
        )
        self.forward_flops = int(stats["forward_flops"])
        self.head_flops = int(self.model.head.in_features * self.model.head.out_features)
        self.stats = stats
        self.cached = cfg.mode == "linear" and not cfg.augment
        mean, std = data.meta["mean"], data.meta["std"]
        common = dict(
            resolution=data.resolution, mean=mean, std=std, device=self.device, num_workers=cfg.loader_workers
        )
        self.test_loader = eval_loader(data.test_path, batch_size=cfg.batch_size, **common)
        if self.cached:
            self.train_batches = eval_loader(data.train_path, batch_size=cfg.batch_size, **common)
        else:
            self.train_batches = train_loader(
                data.train_path,
                batch_size=min(cfg.batch_size, data.n_train),
                scale=cfg.crop_scale,
                ratio=cfg.crop_ratio,
                flip=cfg.flip,
                mixup_alpha=cfg.mixup_alpha,
                seed=cfg.seed,
                **common,
            )
        self.optimizer = build_transfer_optimizer(self.model, cfg)
        steps = len(self.train_batches) if not self.cached else -(-data.n_train // cfg.batch_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, total_steps=steps * cfg.epochs)

    def fit(self, on_epoch: EpochCallback | None = None) -> TransferOutcome:
        cfg = self.cfg
        compute = 0
        if cfg.mode == "linear":
            self.model.eval()  # the frozen body stays in eval mode; only the head trains
        if self.cached:
            train_features, train_labels = extract_features(
                self.model, self.train_batches, device=self.device, precision=self.precision
            )
            test_features, test_labels = extract_features(
                self.model, self.test_loader, device=self.device, precision=self.precision
            )
            train_batches = FeatureBatches(train_features, train_labels, batch_size=cfg.batch_size, seed=cfg.seed)
            test_batches = FeatureBatches(test_features, test_labels, batch_size=cfg.batch_size, shuffle=False)
            compute += (self.forward_flops - self.head_flops) * len(train_labels)
            trained, forward, evaluated, per_example = self.model.head, None, self.model.head, 3 * self.head_flops
        else:
            train_batches, test_batches, evaluated = self.train_batches, self.test_loader, self.model
            if cfg.mode == "finetune":
                trained, forward, per_example = self.model, None, 3 * self.forward_flops
            else:
                trained, forward = self.model.head, self._frozen_body_forward
                per_example = self.forward_flops - self.head_flops + 3 * self.head_flops
        metrics: dict[str, float] = {}
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            try:
                trained_epoch = train_epoch(
                    trained,
                    train_batches,
                    self.optimizer,
                    self.scheduler,
                    device=self.device,
                    precision=self.precision,
                    label_smoothing=cfg.label_smoothing,
                    forward=forward,
                )
            except NonFiniteLoss as error:
                raise MlpscaleError(
                    f"non-finite training loss in epoch {epoch}: {error}; lower lr_head (now "
                    f"{cfg.lr_head}) or lr_body (now {cfg.lr_body})"
                ) from None
            if trained_epoch.examples == 0:
                raise MlpscaleError("the training split yielded no batch; lower batch_size")
            compute += per_example * trained_epoch.examples
            evaluation = evaluate(
                evaluated, test_batches, device=self.device, precision=self.precision, keep_logits=True
            )
            metrics = {
                **trained_epoch.metrics(),
                **evaluation.metrics,
                "compute_flops": float(compute),
                "epoch_time_s": time.perf_counter() - start,
            }
            log.info("epoch %d/%d: %s", epoch, cfg.epochs, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if on_epoch is not None:
                on_epoch(epoch, metrics)
        return TransferOutcome(self.model, metrics, evaluation.logits, evaluation.labels, self.device, self.precision)

    def _frozen_body_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Head logits of images through the frozen body, which runs without gradients."""
        with torch.no_grad():
            features = self.model.features(images)
        return self.model.head(features)
