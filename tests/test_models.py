"""Model zoo: the paper's sizes, the name grammar, forward shapes per option, analytic vs counted params/FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mlpscale.errors import MlpscaleError
from mlpscale.models import (
    ArchSpec,
    build_model,
    count_params,
    estimate_training_memory,
    model_stats,
    parse_arch,
    training_compute,
)
from mlpscale.paths import repo_root

# Paper Table 3: 64x64x3 input, 11,230 classes (ImageNet-21k), params in millions as printed (truncated).
TABLE_3 = {
    "B_6-Wi_256": 9,
    "B_12-Wi_256": 12,
    "B_6-Wi_512": 24,
    "B_12-Wi_512": 37,
    "B_6-Wi_1024": 74,
    "B_12-Wi_1024": 124,
}


@pytest.mark.parametrize("arch, millions", TABLE_3.items())
def test_table_3_parameter_counts(arch, millions):
    stats = model_stats(arch, resolution=64, num_classes=11230)
    assert int(stats["num_params"] / 1e6) == millions


def test_table_7_parameters_and_forward_flops():
    stats = model_stats("B_12-Wi_768", resolution=64, num_classes=1000)
    assert round(stats["num_params"] / 1e6, 2) == 66.89
    assert round(stats["forward_flops"] / 1e6, 1) == 66.8


def test_table_7_holds_for_the_instantiated_model():
    with torch.device("meta"):  # the real module structure, without allocating or initialising 67M weights
        model = build_model("B_12-Wi_768", resolution=64, num_classes=1000)
        images = torch.randn(1, 3, 64, 64)
    stats = model_stats("B_12-Wi_768", resolution=64, num_classes=1000)
    assert count_params(model) == stats["num_params"]
    with FlopCounterMode(display=False) as counter:
        model(images)
    assert counter.get_total_flops() == 2 * stats["forward_flops"]  # torch counts a MAC as 2 FLOPs


@pytest.mark.parametrize(
    "name, spec",
    [
        ("B_6-Wi_1024", ArchSpec("B", 6, 1024)),
        ("S_3-Wi_17", ArchSpec("S", 3, 17)),
        (" B_12-Wi_768 ", ArchSpec("B", 12, 768)),
    ],
)
def test_parse_arch_accepts_any_depth_and_width(name, spec):
    assert parse_arch(name) == spec
    assert parse_arch(name).name == name.strip()


@pytest.mark.parametrize(
    "bad",
    [
        "B6-Wi_1024",
        "B_6-W_1024",
        "M_6-Wi_1024",
        "B_6-Wi_",
        "b_6-wi_64",
        "B_0-Wi_64",
        "B_6-Wi_0",
        "B_-1-Wi_64",
        "",
        "resnet18",
    ],
)
def test_bad_names_raise_with_the_grammar(bad):
    with pytest.raises(MlpscaleError, match=r"B_<depth>-Wi_<width>"):
        parse_arch(bad)


@pytest.mark.parametrize("arch", ["B_2-Wi_32", "S_2-Wi_32"])
@pytest.mark.parametrize(
    "activation, normalization, dropout, final_norm",
    [
        ("gelu", "layer", 0.0, False),
        ("relu", "batch", 0.1, True),
        ("gelu", "none", 0.5, False),
    ],
)
def test_forward_shapes_and_counts_for_every_option(arch, activation, normalization, dropout, final_norm):
    options = dict(
        resolution=8, num_classes=7, in_channels=3, expansion=3, normalization=normalization, final_norm=final_norm
    )
    model = build_model(arch, activation=activation, dropout=dropout, **options)
    images = torch.randn(5, 3, 8, 8)
    model.train()
    logits = model(images)
    assert logits.shape == (5, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model.features(images).shape == (5, 32)
    assert torch.equal(model(images), model.head(model.features(images)))
    assert isinstance(model.embed, torch.nn.Linear) and model.embed.in_features == 3 * 8 * 8
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    assert len(model.blocks) == 2
    assert isinstance(model.norm, torch.nn.Identity) != final_norm
    stats = model_stats(arch, **options)
    assert count_params(model) == stats["num_params"]
    with FlopCounterMode(display=False) as counter:
        model(images[:1])
    assert counter.get_total_flops() == 2 * stats["forward_flops"]


def test_blocks_follow_the_paper_layout():
    model = build_model("B_1-Wi_4", resolution=2, num_classes=3, in_channels=1)
    block = model.blocks[0]
    assert (block.expand.in_features, block.expand.out_features) == (4, 16)
    assert (block.collapse.in_features, block.collapse.out_features) == (16, 4)
    x = torch.randn(6, 4)
    expected = x + block.collapse(
        torch.nn.functional.gelu(
            block.expand(torch.nn.functional.layer_norm(x, (4,), block.norm.weight, block.norm.bias))
        )
    )
    assert torch.allclose(block(x), expected)
    standard = build_model("S_1-Wi_4", resolution=2, num_classes=3, in_channels=1, activation="relu").blocks[0]
    expected = standard.linear(torch.relu(standard.norm(x)))
    assert torch.allclose(standard(x), expected)


def test_bad_options_and_input_size_raise():
    with pytest.raises(MlpscaleError, match="activation='tanh'"):
        build_model("B_2-Wi_32", resolution=8, num_classes=2, activation="tanh")
    with pytest.raises(MlpscaleError, match="normalization='group'"):
        build_model("B_2-Wi_32", resolution=8, num_classes=2, normalization="group")
    with pytest.raises(MlpscaleError, match="dropout"):
        build_model("B_2-Wi_32", resolution=8, num_classes=2, dropout=1.0)
    model = build_model("B_2-Wi_32", resolution=8, num_classes=2)
    with pytest.raises(MlpscaleError, match="resolution"):
        model(torch.randn(2, 3, 16, 16))


def test_mid_size_model_matches_its_analytic_count():
    model = build_model("B_6-Wi_256", resolution=32, num_classes=100)
    assert count_params(model) == model_stats("B_6-Wi_256", resolution=32, num_classes=100)["num_params"]


def test_reset_head_keeps_the_body():
    model = build_model("B_2-Wi_32", resolution=8, num_classes=10)
    embed = model.embed.weight.clone()
    model.reset_head(4)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    assert torch.equal(model.embed.weight, embed)


def test_training_compute_is_eq_4():
    assert training_compute(66_828_288, 1_000_000, 100) == 3 * 66_828_288 * 1_000_000 * 100
    assert training_compute(10, 7, 2.5) == 525


def test_memory_estimate_parts():
    kwargs = dict(resolution=16, num_classes=10, in_channels=3)
    params = model_stats("B_2-Wi_32", **kwargs)["num_params"]
    lion = estimate_training_memory("B_2-Wi_32", batch_size=8, optimizer="lion", precision="fp32", **kwargs)
    assert lion["weights"] == lion["gradients"] == lion["optimizer_state"] == 4 * params
    assert lion["total"] == sum(v for k, v in lion.items() if k != "total")
    adamw = estimate_training_memory("B_2-Wi_32", batch_size=8, optimizer="adamw", precision="fp32", **kwargs)
    assert adamw["optimizer_state"] == 2 * lion["optimizer_state"]
    double = estimate_training_memory("B_2-Wi_32", batch_size=16, optimizer="lion", precision="fp32", **kwargs)
    assert double["activations"] == 2 * lion["activations"]
    bf16 = estimate_training_memory("B_2-Wi_32", batch_size=8, optimizer="lion", precision="bf16", **kwargs)
    assert lion["activations"] / 2 < bf16["activations"] < lion["activations"]
    assert bf16["batch_and_logits"] == 8 * (4 * 3 * 16 * 16 + 2 * 10)  # the fp32 batch, bf16 logits
    assert bf16["loader_slots"] == lion["loader_slots"] == 5 * 8 * 3 * 16 * 16  # uint8 FFCV slots on the GPU
    assert lion["autocast_weights"] == 0
    assert bf16["autocast_weights"] == 2 * model_stats("B_2-Wi_32", **kwargs)["forward_flops"]
    with pytest.raises(MlpscaleError, match="optimizer='rmsprop'"):
        estimate_training_memory("B_2-Wi_32", batch_size=8, optimizer="rmsprop", **kwargs)


def test_model_info_job_prints_json():
    result = subprocess.run(
        [
            sys.executable,
            "jobs/model_info.py",
            "B_12-Wi_768",
            "--resolution",
            "64",
            "--num-classes",
            "1000",
            "--n-train",
            "1000",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--optimizer",
            "adamw",
        ],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    stats = model_stats("B_12-Wi_768", resolution=64, num_classes=1000)
    assert info["arch"] == "B_12-Wi_768"
    assert info["params"] == stats["num_params"]
    assert info["forward_flops"] == stats["forward_flops"]
    assert info["compute_flops"] == 3 * stats["forward_flops"] * 1000 * 2
    memory = estimate_training_memory(
        "B_12-Wi_768", resolution=64, num_classes=1000, batch_size=256, optimizer="adamw", precision="bf16"
    )
    assert {k: info["memory"][k] for k in memory} == memory
    assert info["memory"]["total_gib"] == pytest.approx(memory["total"] / 2**30, abs=1e-3)


def test_model_info_job_reports_user_errors_without_traceback(capsys):
    import runpy

    main = runpy.run_path(str(repo_root() / "jobs" / "model_info.py"))["main"]
    assert main(["X_6-Wi_64", "--resolution", "64", "--num-classes", "10"]) == 2
    assert main(["B_6-Wi_64", "--resolution", "64", "--num-classes", "10", "--n-train", "100"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'X_6-Wi_64'" in err and "--epochs" in err and "Traceback" not in err


def _bytes_saved_for_backward(model, images, labels, bf16: bool = False) -> int:
    """What autograd really keeps: the non-parameter tensors saved during forward + loss, each counted once.

    With bf16 the forward runs under CPU autocast and the loss on fp32 logits, as the training loop does;
    autocast's bf16 copies of the weights (saved as they are or transposed) are left out: the memory
    estimate counts them apart."""
    parameters = {p.data_ptr() for p in model.parameters()}
    weight_shapes = {shape for p in model.parameters() for shape in (tuple(p.shape), tuple(p.shape)[::-1])}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters and not (bf16 and tuple(tensor.shape) in weight_shapes):
            saved[(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.1)
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["B_2-Wi_32", "S_3-Wi_48"])
def test_bf16_activation_estimate_covers_what_autograd_saves_under_autocast(arch):
    """CPU autocast keeps the norms' inputs in bf16 where CUDA's keeps them in fp32: the estimate (planned for
    CUDA) may be above the CPU's measure by those 2 bytes per norm input value, never below it."""
    options = dict(resolution=16, num_classes=200)  # enough classes for the fp32 log-probabilities to count
    batch = 24  # unlike any weight's shape
    measured = _bytes_saved_for_backward(
        build_model(arch, **options), torch.randn(batch, 3, 16, 16), torch.randint(0, 200, (batch,)), bf16=True
    )
    estimate = estimate_training_memory(arch, batch_size=batch, precision="bf16", **options)["activations"]
    assert measured <= estimate < measured * 1.1


@pytest.mark.parametrize("arch", ["B_2-Wi_32", "S_3-Wi_48"])
@pytest.mark.parametrize("normalization, final_norm", [("layer", False), ("batch", True), ("none", False)])
def test_activation_estimate_matches_what_autograd_saves(arch, normalization, final_norm):
    options = dict(resolution=16, num_classes=10, normalization=normalization, final_norm=final_norm)
    model = build_model(arch, **options)
    measured = _bytes_saved_for_backward(model, torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    estimate = estimate_training_memory(arch, batch_size=32, precision="fp32", **options)["activations"]
    assert abs(measured - estimate) / measured < 0.03  # the rest: norm statistics and the labels
