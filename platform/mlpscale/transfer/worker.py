"""The downstream training loop: fine-tuning (whole model, head and body learning rates) or linear probing.

finetune: a new head, every parameter trained; the optimizer gets the body's and the head's
parameters as separate groups (paper: SGD with momentum, 0.001 and 0.01).
linear: a new head on the frozen body; without augmentation the features of both splits are
computed once (features.py) and every epoch trains the head on them.
Compute per epoch (FLOPs as multiply-accumulates, design.md): finetune 3*f*N; linear probe
f_body*N once for cached features (per epoch when augmenting) plus 3*f_head*N.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from mlpscale.data.loaders import eval_loader, train_loader
from mlpscale.errors import MlpscaleError
from mlpscale.models import model_stats
from mlpscale.train.losses import mixup_correct, mixup_cross_entropy
from mlpscale.train.optim import parameter_groups
from mlpscale.train.precision import autocast, enable_fast_matmul, resolve_precision
from mlpscale.train.schedule import build_scheduler
from mlpscale.transfer.config import TransferConfig
from mlpscale.transfer.data import DownstreamData
from mlpscale.transfer.evaluation import accuracy_metrics, predict
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
        stats = model_stats(spec["arch"], resolution=data.resolution, num_classes=data.num_classes,
                            in_channels=spec.get("in_channels", 3), expansion=spec.get("expansion", 4),
                            normalization=spec.get("normalization", "layer"))
        self.forward_flops = int(stats["forward_flops"])
        self.head_flops = int(self.model.head.in_features * self.model.head.out_features)
        self.stats = stats
        self.cached = cfg.mode == "linear" and not cfg.augment
        mean, std = data.meta["mean"], data.meta["std"]
        common = dict(resolution=data.resolution, mean=mean, std=std, device=self.device,
                      num_workers=cfg.loader_workers)
        self.test_loader = eval_loader(data.test_path, batch_size=cfg.batch_size, **common)
        if self.cached:
            self.train_batches = eval_loader(data.train_path, batch_size=cfg.batch_size, **common)
        else:
            self.train_batches = train_loader(
                data.train_path, batch_size=min(cfg.batch_size, data.n_train), scale=cfg.crop_scale,
                ratio=cfg.crop_ratio, flip=cfg.flip, mixup_alpha=cfg.mixup_alpha, seed=cfg.seed, **common)
        self.optimizer = build_transfer_optimizer(self.model, cfg)
        steps = len(self.train_batches) if not self.cached else -(-data.n_train // cfg.batch_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, total_steps=steps * cfg.epochs)

    def autocast(self):
        return autocast(self.device, self.precision)

    def fit(self, on_epoch: EpochCallback | None = None) -> TransferOutcome:
        cfg = self.cfg
        compute = 0
        if self.cached:
            train_features, train_labels = extract_features(self.model, self.train_batches, self.autocast)
            test_features, test_labels = extract_features(self.model, self.test_loader, self.autocast)
            batches = FeatureBatches(train_features, train_labels, batch_size=cfg.batch_size, seed=cfg.seed)
            compute += (self.forward_flops - self.head_flops) * len(train_labels)
        metrics: dict[str, float] = {}
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            if self.cached:
                train = self._train_head_epoch(batches)
                compute += 3 * self.head_flops * train["examples"]
                logits = self._head_logits(test_features)
                labels = test_labels.cpu()
            else:
                train = self._train_epoch()
                per_example = (3 * self.forward_flops if cfg.mode == "finetune"
                               else self.forward_flops - self.head_flops + 3 * self.head_flops)
                compute += per_example * train["examples"]
                logits, labels = predict(self.model, self.test_loader, self.autocast)
            elapsed = time.perf_counter() - start
            metrics = {"train_loss": train["loss"], "train_top1": train["top1"],
                       **accuracy_metrics(logits, labels), "compute_flops": float(compute),
                       "throughput_img_s": train["examples"] / max(train["seconds"], 1e-9),
                       "epoch_time_s": elapsed}
            log.info("epoch %d/%d: %s", epoch, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if on_epoch is not None:
                on_epoch(epoch, metrics)
        return TransferOutcome(self.model, metrics, logits, labels, self.device, self.precision)

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def _train_epoch(self) -> dict[str, float]:
        """One pass of the image loader; in linear mode the body runs without gradients."""
        self.model.train(self.cfg.mode == "finetune")
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        for batch in self.train_batches:
            with self.autocast():
                if self.cfg.mode == "finetune":
                    logits = self.model(batch.images)
                else:
                    with torch.no_grad():
                        features = self.model.features(batch.images)
                    logits = self.model.head(features)
                loss = mixup_cross_entropy(logits.float(), batch.labels, batch.labels_mixed, batch.lam,
                                           self.cfg.label_smoothing)
            self._step(loss)
            total_loss += loss.detach() * len(batch.labels)
            correct += mixup_correct(logits.detach(), batch.labels, batch.labels_mixed, batch.lam)
            seen += len(batch.labels)
        return self._summary(total_loss, correct, seen, time.perf_counter() - start)

    def _train_head_epoch(self, batches: FeatureBatches) -> dict[str, float]:
        self.model.head.train()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        for features, labels in batches:
            with self.autocast():
                logits = self.model.head(features)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels,
                                                         label_smoothing=self.cfg.label_smoothing)
            self._step(loss)
            total_loss += loss.detach() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += len(labels)
        return self._summary(total_loss, correct, seen, time.perf_counter() - start)

    @torch.no_grad()
    def _head_logits(self, features: torch.Tensor) -> torch.Tensor:
        self.model.head.eval()
        with self.autocast():
            return self.model.head(features).float().cpu()

    @staticmethod
    def _summary(total_loss: torch.Tensor, correct: torch.Tensor, seen: int, seconds: float) -> dict[str, float]:
        if seen == 0:
            raise MlpscaleError("the training split yielded no batch; lower batch_size")
        return {"loss": float(total_loss) / seen, "top1": float(correct) / seen, "examples": seen,
                "seconds": seconds}
