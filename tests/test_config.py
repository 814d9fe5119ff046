"""PretrainConfig: defaults, presets, YAML round trip, CLI overrides and validation messages (no Ray)."""

from __future__ import annotations

import argparse

import pytest

from mlpscale.config import (
    FIELD_NAMES,
    PRESETS,
    PretrainConfig,
    add_config_arguments,
    config_from_args,
    load_config,
    save_yaml,
)
from mlpscale.errors import MlpscaleError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_valid_and_the_cpu_digits_run():
    cfg = load_config()
    assert cfg == PretrainConfig()
    assert cfg.dataset == "digits" and cfg.image_resolution == 16 and cfg.optimizer == "lion"


def test_presets_follow_the_paper():
    scratch = load_config(preset="from-scratch")
    assert (scratch.optimizer, scratch.lr, scratch.label_smoothing) == ("lion", 5e-5, 0.3)
    assert scratch.mixup_alpha > 0
    in21k = load_config(preset="in21k")
    assert (in21k.batch_size, in21k.optimizer, in21k.lr, in21k.weight_decay) == (16384, "lion", 1e-5, 1e-3)
    assert (in21k.label_smoothing, in21k.mixup_alpha) == (0.3, 0.8)
    assert in21k.batch_size % in21k.accumulation_steps == 0
    with pytest.raises(MlpscaleError, match="from-scratch"):
        load_config(preset="nope")


def test_yaml_round_trip_and_precedence(tmp_path):
    cfg = load_config(preset="in21k", overrides={"lr": "3e-4", "crop_scale": [0.2, 1], "n_train": 300})
    path = save_yaml(cfg, tmp_path / "best.yaml")
    assert load_config(path) == cfg
    # file beats preset, overrides beat file
    again = load_config(path, overrides={"epochs": 7}, preset="from-scratch")
    assert again.lr == 3e-4 and again.epochs == 7 and again.batch_size == 16384


def test_every_field_has_a_cli_option_with_dashes_or_underscores():
    cfg = parse(
        [
            "--batch-size",
            "64",
            "--weight_decay",
            "0.01",
            "--crop-scale",
            "0.3",
            "1.0",
            "--flip",
            "true",
            "--n-train",
            "300",
            "--register",
            "mymodel",
            "--use-gpu",
            "false",
        ]
    )
    assert (cfg.batch_size, cfg.weight_decay, cfg.crop_scale, cfg.flip) == (64, 0.01, (0.3, 1.0), True)
    assert (cfg.n_train, cfg.register, cfg.use_gpu) == (300, "mymodel", False)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    dests = {action.dest for action in parser._actions}
    assert all(f"cfg__{name}" in dests for name in FIELD_NAMES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimzer": "lion"}, "unknown config key 'optimzer'"),
        ({"optimizer": "adam"}, "lion, adamw, sgd"),
        ({"schedule": "step"}, "none, cosine, warmup_cosine"),
        ({"precision": "fp16"}, "auto, bf16, fp32"),
        ({"epochs": 0}, "epochs=0 must be positive"),
        ({"lr": -1}, "lr=-1.0 must be positive"),
        ({"lr": "fast"}, "not a valid number"),
        ({"batch_size": 1.5}, "not a valid integer"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"crop_scale": [0.9, 0.1]}, "crop_scale"),
        ({"batch_size": 100, "accumulation_steps": 3}, "divisible"),
        ({"flip": "maybe"}, "true or false"),
        ({"warmup_epochs": 50, "epochs": 10}, "warmup_epochs"),
        ({"loader_workers": 0}, "loader_workers=0 must be positive (or none for the default)"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(MlpscaleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(MlpscaleError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(MlpscaleError, match="mapping"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("arch: B_2-Wi_32\nlearning_rate: 0.1\n")
    with pytest.raises(MlpscaleError, match="learning_rate"):
        load_config(unknown)


def test_presets_only_use_known_fields():
    for values in PRESETS.values():
        assert set(values) <= set(FIELD_NAMES)
