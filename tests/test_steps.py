"""The shared training epoch and evaluator (train/steps.py) and the micro-batch rule (train/spec.py); no Ray."""

from __future__ import annotations

import pytest
import torch

from mlpscale.config import PretrainConfig
from mlpscale.data.loaders import Batch
from mlpscale.models import build_model
from mlpscale.train import steps
from mlpscale.train.schedule import build_scheduler
from mlpscale.train.spec import WorkerSpec, micro_batch
from mlpscale.train.steps import NonFiniteLoss, accuracy_metrics, evaluate, train_epoch
from mlpscale.transfer.features import FeatureBatches

CPU = torch.device("cpu")


def batches(count: int, size: int = 8, classes: int = 3, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Batch(
            torch.randn(size, 3, 4, 4, generator=generator),
            torch.randint(0, classes, (size,), generator=generator),
            None,
            1.0,
        )
        for _ in range(count)
    ]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("B_1-Wi_16", resolution=4, num_classes=3)


def sgd(model: torch.nn.Module, lr: float = 0.1):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return optimizer, build_scheduler(optimizer, "none", total_steps=100)


def test_micro_batch_is_the_global_batch_over_accumulation_and_workers():
    cfg = PretrainConfig(batch_size=128, accumulation_steps=2, num_workers=2)
    assert micro_batch(cfg) == 32
    assert micro_batch(cfg, workers=1) == 64
    assert micro_batch(cfg, accumulation_steps=8) == 8
    spec = WorkerSpec(
        cfg=cfg,
        train_path="t",
        test_path="v",
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        num_classes=3,
        resolution=4,
        n_train=256,
        forward_flops=1,
        workers=1,
    )
    assert spec.micro_batch == 64  # the workers the launcher starts, not cfg.num_workers
    assert WorkerSpec.from_loop_config(spec.loop_config()) is spec


def test_train_epoch_accumulates_counts_and_measures():
    model = tiny_model()
    optimizer, scheduler = sgd(model)
    data = batches(6)
    result = train_epoch(model, data, optimizer, scheduler, device=CPU, accumulation_steps=3)
    assert scheduler.last_epoch == 2  # 6 micro-batches, 3 per optimizer step
    assert result.examples == 48 and result.seconds > 0
    assert 0.0 <= result.top1 <= 1.0 and result.loss > 0
    assert set(result.metrics()) == {"train_loss", "train_top1", "throughput_img_s"}
    assert result.metrics()["throughput_img_s"] == pytest.approx(48 / result.seconds)


def test_train_epoch_loss_is_the_mean_over_examples():
    model = tiny_model()
    data = batches(2)
    with torch.no_grad():
        expected = sum(float(torch.nn.functional.cross_entropy(model(b.images), b.labels)) for b in data) / 2
    optimizer, scheduler = sgd(model, lr=0.0)  # lr 0: the model the losses were measured with stays
    assert train_epoch(model, data, optimizer, scheduler, device=CPU).loss == pytest.approx(expected, rel=1e-5)


def test_grad_clip_bounds_the_step():
    model = tiny_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer, scheduler = sgd(model, lr=1.0)
    train_epoch(model, batches(1), optimizer, scheduler, device=CPU, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_a_nonfinite_loss_stops_the_epoch():
    model = tiny_model()
    optimizer, scheduler = sgd(model)
    steps.LOSS_HOOKS.append(lambda loss: loss * float("nan"))
    try:
        with pytest.raises(NonFiniteLoss, match="nan"):
            train_epoch(model, batches(2), optimizer, scheduler, device=CPU)
    finally:
        steps.LOSS_HOOKS.clear()


def test_linear_probe_trains_the_head_on_cached_features_or_through_a_frozen_body():
    model = tiny_model()
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("head.")
    body_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    head_before = model.head.weight.detach().clone()
    model.eval()
    data = batches(3)
    features = torch.cat([model.features(b.images) for b in data]).detach()
    labels = torch.cat([b.labels for b in data])

    optimizer, scheduler = sgd(model.head)
    cached = train_epoch(model.head, FeatureBatches(features, labels, batch_size=8), optimizer, scheduler, device=CPU)

    def frozen_body(images):
        with torch.no_grad():
            body = model.features(images)
        return model.head(body)

    through = train_epoch(model.head, data, optimizer, scheduler, device=CPU, forward=frozen_body)
    assert cached.examples == through.examples == 24
    assert not torch.equal(model.head.weight, head_before)
    for key, value in body_before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_evaluate_scores_like_accuracy_metrics_and_keeps_the_logits():
    model = tiny_model()
    data = batches(3, size=5)
    scored = evaluate(model, data, keep_logits=True)
    assert scored.logits.shape == (15, 3) and torch.equal(scored.labels, torch.cat([b.labels for b in data]))
    assert scored.metrics == pytest.approx(accuracy_metrics(scored.logits, scored.labels))
    assert set(scored.metrics) == {"val_loss", "val_top1", "val_top5"}
    assert scored.metrics["val_top5"] == 1.0  # top-5 of 3 classes is every class
    assert evaluate(model, data).logits is None
    with torch.no_grad():
        hits = (torch.cat([model(b.images) for b in data]).argmax(1) == scored.labels).float().mean()
    assert scored.metrics["val_top1"] == pytest.approx(float(hits))
