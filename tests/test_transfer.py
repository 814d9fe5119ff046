"""Transfer: fine-tune and linear-probe a digits-pretrained MLP on a small CIFAR-format dataset written here.

One real pretraining run (Ray Train, 1 epoch) per module; the downstream dataset is stored at 8 px
and upscaled to the source's 16 px in the loader (the paper's 32 -> 64 px, scaled down).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpscale import tracking
from mlpscale.errors import MlpscaleError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue", "white"]
N_TRAIN, N_TEST = 200, 80


def _cifar_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """32x32 RGB images whose class is a bright channel (or all three) in one quadrant, over noise."""
    images = rng.integers(0, 90, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for index, label in enumerate(labels):
        rows, cols = divmod(int(label), 2)
        channels = [label] if label < 3 else [0, 1, 2]
        images[index, channels, rows * 16 : rows * 16 + 16, cols * 16 : cols * 16 + 16] = 230
    return images.reshape(len(labels), -1)


def write_cifar10(folder: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """The CIFAR-10 python layout (data_batch_1..5, test_batch, batches.meta); returns (folder, test labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = np.arange(N_TRAIN) % len(CLASSES)
    test_labels = rng.permutation(np.arange(N_TEST) % len(CLASSES))
    train_images = _cifar_images(train_labels, rng)
    for batch in range(5):
        part = slice(batch * N_TRAIN // 5, (batch + 1) * N_TRAIN // 5)
        blob = {b"data": train_images[part], b"labels": train_labels[part].tolist()}
        (folder / f"data_batch_{batch + 1}").write_bytes(pickle.dumps(blob))
    test = {b"data": _cifar_images(test_labels, rng), b"labels": test_labels.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    return folder, test_labels


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (the pretraining run and every transfer run share it)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def pretrained(digits_dir, store, ray_local, tmp_path_factory):
    """A B_2-Wi_32 pretrained for 1 epoch on 300 digits at 16 px, registered as tiny-src (alias base)."""
    from mlpscale.config import load_config
    from mlpscale.train.pretrain import run_pretraining

    cfg = load_config(
        overrides={
            "arch": "B_2-Wi_32",
            "dataset": "digits",
            "data_dir": str(digits_dir),
            "n_train": 300,
            "epochs": 1,
            "batch_size": 64,
            "loader_workers": 1,
            "precision": "fp32",
            "schedule": "none",
            "tracking_uri": store,
            "experiment": "pretrain",
            "register": "tiny-src",
            "storage_path": str(tmp_path_factory.mktemp("ray")),
            "run_name": "transfer-source",
            "flip": True,
        }
    )
    result = run_pretraining(cfg)
    tracking.client(store).set_registered_model_alias("tiny-src", "base", "1")
    return result


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    """The CIFAR-format dataset converted at 8 px: (data root, test labels in file order)."""
    from mlpscale.data.prepare import prepare_dataset

    source, test_labels = write_cifar10(tmp_path_factory.mktemp("cifar-src") / "cifar-10-batches-py")
    root = tmp_path_factory.mktemp("cifar-data")
    prepare_dataset("cifar10", source=source, data_dir=root, resolution=8)
    return root, test_labels


def transfer_config(pretrained, downstream, store, **overrides):
    from mlpscale.transfer.config import load_transfer_config

    values = {
        "source": pretrained.run_id,
        "dataset": "cifar10",
        "data_dir": str(downstream[0]),
        "epochs": 2,
        "batch_size": 32,
        "loader_workers": 1,
        "precision": "fp32",
        "tracking_uri": store,
        "experiment": "transfer-test",
    }
    values.update(overrides)
    return load_transfer_config(overrides=values)


def test_finetune_tracks_record_lineage_tta_and_real(pretrained, downstream, store, tmp_path):
    from mlpscale.models import model_stats, training_compute
    from mlpscale.transfer.run import run_transfer

    real = tmp_path / "real.json"
    real.write_text(json.dumps([[int(label)] for label in downstream[1]]))
    cfg = transfer_config(
        pretrained, downstream, store, mode="finetune", tta=3, real_labels=str(real), register="tiny-ft"
    )
    result = run_transfer(cfg)

    mlflow_client = tracking.client(store)
    run = mlflow_client.get_run(result.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags[tracking.TAG_JOB] == "finetune"
    assert tags[tracking.TAG_SOURCE_RUN] == pretrained.run_id == result.source_run_id
    assert run.info.status == "FINISHED"
    assert (params["mode"], float(params["lr_head"]), float(params["lr_body"])) == ("finetune", 0.01, 0.001)
    assert (params["optimizer"], params["tta"], params["arch"]) == ("sgd", "3", "B_2-Wi_32")
    assert (params["resolution"], params["data_resolution"], params["n_train"]) == ("16", "8", str(N_TRAIN))
    for key in (
        "depth",
        "width",
        "num_params",
        "forward_flops",
        "dataset",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "label_smoothing",
        "mixup_alpha",
        "seed",
        "expansion",
    ):
        assert key in params, key
    history = mlflow_client.get_metric_history(result.run_id, "val_top1")
    assert sorted(m.step for m in history) == [1, 2]
    for key in ("train_loss", "train_top1", "val_loss", "val_top5", "throughput_img_s", "epoch_time_s"):
        assert key in metrics, key
    assert 0.0 <= metrics["val_top1_tta"] <= 1.0
    # one acceptable label per image (the true one): ReaL accuracy is plain accuracy
    assert metrics["val_real_top1"] == pytest.approx(metrics["val_top1"])
    f = model_stats("B_2-Wi_32", resolution=16, num_classes=len(CLASSES))["forward_flops"]
    seen_per_epoch = (N_TRAIN // 32) * 32
    assert metrics["compute_flops"] == training_compute(f, seen_per_epoch, 2)
    assert metrics["val_top1"] > 1.0 / len(CLASSES)  # the quadrant colours are easy to learn

    artifacts = {a.path for a in mlflow_client.list_artifacts(result.run_id)}
    assert {"config.yaml", "meta.json", "plots"} <= artifacts
    assert [a.path for a in mlflow_client.list_artifacts(result.run_id, "plots")] == ["plots/first_layer_weights.png"]
    model = tracking.load_model(result.model_uri, store)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, len(CLASSES))
    versions = mlflow_client.search_model_versions("name='tiny-ft'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", result.run_id)]

    # the fine-tuned run is itself a source: its lineage and architecture come back
    from mlpscale.tracking.models import resolve_source

    again = resolve_source("models:/tiny-ft/1", store)
    assert (again.run_id, again.arch, again.resolution) == (result.run_id, "B_2-Wi_32", 16)


def test_linear_probe_freezes_body_and_caches_features(pretrained, downstream, store):
    from mlpscale.models import model_stats
    from mlpscale.tracking.models import resolve_source
    from mlpscale.transfer.run import run_transfer

    cfg = transfer_config(
        pretrained, downstream, store, mode="linear", source="tiny-src@base", batch_size=32, lr_head=0.02, epochs=3
    )
    result = run_transfer(cfg)
    run = tracking.client(store).get_run(result.run_id)
    assert run.data.tags[tracking.TAG_JOB] == "linear_probe"
    assert run.data.tags[tracking.TAG_SOURCE_RUN] == pretrained.run_id
    params = run.data.params
    assert (params["optimizer"], params["lr_body"], params["augment"]) == ("lion", "0.0", "False")
    assert "val_top1_tta" not in run.data.metrics and "val_real_top1" not in run.data.metrics
    losses = [
        m.value
        for m in sorted(tracking.client(store).get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)
    ]
    assert losses[-1] < losses[0] and run.data.metrics["val_top1"] > 0.5  # the probe learns the quadrants

    source = resolve_source(pretrained.run_id, store).model
    probed = tracking.load_model(result.model_uri, store)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    for key, value in body.items():
        assert torch.equal(probed.state_dict()[key], value), key
    assert probed.state_dict()["head.weight"].shape == (len(CLASSES), 32)
    # cached features: the body ran once over the train split; the head trains (3x its forward) every epoch
    f = model_stats("B_2-Wi_32", resolution=16, num_classes=len(CLASSES))["forward_flops"]
    head = 32 * len(CLASSES)
    assert run.data.metrics["compute_flops"] == (f - head) * N_TRAIN + 3 * head * N_TRAIN * 3


def test_tta_one_full_crop_equals_plain_evaluation_and_k_crops_average(pretrained, downstream, store):
    from mlpscale.data.loaders import eval_loader, tta_loader
    from mlpscale.data.meta import load_meta
    from mlpscale.tracking.models import resolve_source
    from mlpscale.train.steps import evaluate
    from mlpscale.transfer.evaluation import tta_logits

    def predict(model, batches):
        evaluation = evaluate(model, batches, keep_logits=True)
        return evaluation.logits, evaluation.labels

    model = resolve_source(pretrained.run_id, store).model
    root = downstream[0]
    meta = load_meta(root / "cifar10" / "res8")
    test = root / "cifar10" / "res8" / "test.beton"
    common = dict(batch_size=32, resolution=16, mean=meta["mean"], std=meta["std"], device="cpu", num_workers=1)
    plain, labels = predict(model, eval_loader(test, **common))
    assert torch.equal(labels, torch.as_tensor(downstream[1]))

    full = tta_loader(test, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, seed=5, **common)
    one, _ = tta_logits(model, full, 1)
    assert torch.allclose(one, plain, atol=1e-5)

    def crops(seed):
        return tta_loader(test, scale=(0.3, 0.6), ratio=(0.75, 1.33), seed=seed, **common)

    three, tta_labels = tta_logits(model, crops(1), 3)
    assert torch.equal(tta_labels, labels)
    assert not torch.allclose(three, plain, atol=1e-3)  # crops see other pixels
    passes = crops(1)  # the same seed: pass k of a fresh loader is view k
    singles = []
    for k in range(3):
        passes.set_epoch(k)
        singles.append(predict(model, passes)[0])
    assert torch.allclose(three, torch.stack(singles).mean(0), atol=1e-5)  # the average of the K views
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # each view is a new crop
    again, _ = tta_logits(model, crops(1), 3)
    assert torch.equal(again, three)  # reproducible for a seed
    other, _ = tta_logits(model, crops(2), 3)
    assert not torch.allclose(other, three, atol=1e-3)


def test_real_accuracy_on_hand_made_labels(tmp_path):
    from mlpscale.transfer.real_labels import load_real_labels, real_top1

    file = tmp_path / "real.json"
    file.write_text(json.dumps([[0, 2], [], [1], [3, 1], [2]]))
    labels = load_real_labels(file, num_images=5, num_classes=4)
    # image 1 is left out; 0: 2 in [0, 2] yes; 2: 0 not in [1]; 3: 1 in [3, 1] yes; 4: 2 yes
    assert real_top1(torch.tensor([2, 3, 0, 1, 2]), labels) == pytest.approx(3 / 4)
    with pytest.raises(MlpscaleError, match="5 entries but the validation set has 6"):
        load_real_labels(file, num_images=6)
    file.write_text(json.dumps([[0], [7]]))
    with pytest.raises(MlpscaleError, match="entry 1 holds 7"):
        load_real_labels(file, num_images=2, num_classes=4)
    file.write_text("{not json")
    with pytest.raises(MlpscaleError, match="not valid JSON"):
        load_real_labels(file, num_images=2)


def test_weights_picture_is_channel_max_of_first_layer(tmp_path):
    from mlpscale.models import build_model
    from mlpscale.weights_picture import first_layer_filters, save_weights_picture

    model = build_model("B_1-Wi_32", resolution=4, num_classes=3)
    weight = torch.arange(32 * 48, dtype=torch.float32).reshape(32, 48).neg()  # channel 0 holds the maximum
    model.embed.weight.data.copy_(weight)
    filters = first_layer_filters(model, 4)
    assert filters.shape == (25, 4, 4)
    assert np.array_equal(filters[7], weight[7].reshape(3, 4, 4)[0].numpy())
    png = save_weights_picture(model, 4, tmp_path / "w.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MlpscaleError, match="not a multiple of 5x5"):
        first_layer_filters(model, 5)


def test_checkpoint_directory_source_matches_logged_model(pretrained, store):
    from mlpscale.tracking.models import resolve_source

    from_checkpoint = resolve_source(pretrained.checkpoint_path, store)
    from_run = resolve_source(pretrained.run_id, store)
    assert (from_checkpoint.arch, from_checkpoint.resolution, from_checkpoint.run_id) == (
        "B_2-Wi_32",
        16,
        pretrained.run_id,
    )
    for key, value in from_run.model.state_dict().items():
        assert torch.equal(from_checkpoint.model.state_dict()[key], value), key


def test_a_nonfinite_loss_fails_the_run_naming_the_learning_rates(pretrained, downstream, store):
    from mlpscale.transfer.run import run_transfer

    # lr 1e30 overflows the fine-tuned weights within the first epoch
    cfg = transfer_config(
        pretrained, downstream, store, mode="finetune", lr_head=1e30, lr_body=1e30, epochs=1, run_name="nan-finetune"
    )
    with pytest.raises(MlpscaleError, match="non-finite training loss in epoch 1.*lower lr_head"):
        run_transfer(cfg)
    mlflow_client = tracking.client(store)
    [run] = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("transfer-test").experiment_id],
        filter_string="attributes.run_name = 'nan-finetune'",
    )
    assert run.info.status == "FAILED"
    reason = run.data.tags[tracking.TAG_FAILURE]
    assert "non-finite" in reason and "lr_head (now 1e+30)" in reason and "lr_body (now 1e+30)" in reason
    assert not mlflow_client.get_metric_history(run.info.run_id, "val_top1")  # no epoch was logged


def test_bad_sources_data_and_options(pretrained, downstream, store, tmp_path):
    from mlpscale.tracking.models import resolve_source
    from mlpscale.transfer.data import pick_resolution
    from mlpscale.transfer.run import run_transfer

    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(MlpscaleError, match=f"run {missing} does not exist"):
        resolve_source(missing, store)
    empty_run, _ = tracking.start_run(store, "transfer-test", run_name="no-model")
    with pytest.raises(MlpscaleError, match=f"run {empty_run} .*has no logged model"):
        resolve_source(empty_run, store)
    with pytest.raises(MlpscaleError, match="no such registered model version"):
        resolve_source("tiny-src@nope", store)
    with pytest.raises(MlpscaleError, match="no such checkpoint directory"):
        resolve_source(str(tmp_path / "nowhere"), store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlpscaleError, match="holds no model weights"):
        resolve_source(str(tmp_path / "empty"), store)

    with pytest.raises(MlpscaleError, match="cannot map cifar10 .*32 px.* 16 px"):
        pick_resolution("cifar10", 16, [32])
    assert pick_resolution("cifar10", 64, [8, 32, 128]) == 32
    with pytest.raises(MlpscaleError, match="not converted"):
        run_transfer(transfer_config(pretrained, downstream, store, dataset="cifar100"))

    real = tmp_path / "short.json"
    real.write_text(json.dumps([[0]] * (N_TEST - 1)))
    runs_before = len(
        tracking.client(store).search_runs(
            [tracking.client(store).get_experiment_by_name("transfer-test").experiment_id]
        )
    )
    with pytest.raises(MlpscaleError, match=f"{N_TEST - 1} entries but the validation set has {N_TEST}"):
        run_transfer(transfer_config(pretrained, downstream, store, real_labels=str(real)))
    runs_after = len(
        tracking.client(store).search_runs(
            [tracking.client(store).get_experiment_by_name("transfer-test").experiment_id]
        )
    )
    assert runs_after == runs_before  # bad input is caught before a run is created

    with pytest.raises(MlpscaleError, match="unknown transfer config key 'lr'"):
        transfer_config(pretrained, downstream, store, lr=0.1)
    with pytest.raises(MlpscaleError, match="mode='probe' is not allowed"):
        transfer_config(pretrained, downstream, store, mode="probe")


def test_grid_runs_tune_trials_as_child_runs(pretrained, downstream, store, tmp_path):
    from mlpscale.transfer.run import parse_grid, run_transfer_grid

    grid = parse_grid(["lr_head=0.001,0.01"])
    assert grid == {"lr_head": [0.001, 0.01]}
    cfg = transfer_config(
        pretrained,
        downstream,
        store,
        mode="linear",
        epochs=1,
        batch_size=64,
        experiment="transfer-grid",
        log_model=False,
    )
    parent_id, rows = run_transfer_grid(cfg, grid, storage_path=str(tmp_path / "tune"))
    assert sorted(row["lr_head"] for row in rows) == [0.001, 0.01]
    mlflow_client = tracking.client(store)
    parent = mlflow_client.get_run(parent_id)
    assert parent.data.tags[tracking.TAG_JOB] == "sweep" and parent.info.status == "FINISHED"
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(float(c.data.params["lr_head"]) for c in children) == [0.001, 0.01]
    for child in children:
        assert child.data.tags[tracking.TAG_JOB] == "linear_probe"
        assert child.data.tags[tracking.TAG_SOURCE_RUN] == pretrained.run_id
        assert child.data.tags[tracking.TAG_SWEEP_ID] == parent.data.tags[tracking.TAG_SWEEP_ID]


@pytest.mark.integration
def test_job_reports_a_missing_source_without_traceback(store, tmp_path):
    missing = "fedcba9876543210fedcba9876543210"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "finetune.py"),
            "--source",
            missing,
            "--dataset",
            "cifar10",
            "--mode",
            "linear",
            "--tracking-uri",
            store,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert completed.returncode == 2, completed.stderr
    assert f"run {missing} does not exist" in completed.stderr
    assert "Traceback" not in completed.stderr
