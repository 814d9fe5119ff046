"""The docs' field tables are the generated ones, every field says what it means, and each choice list the configs
offer is the one the code implementing it dispatches on (no Ray, no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mlpscale import config_fields
from mlpscale.config import PretrainConfig, add_config_arguments, user_overrides
from mlpscale.transfer.config import TransferConfig, add_transfer_arguments, config_from_args

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    "doc, module", [("pretrain.md", "mlpscale.config"), ("transfer.md", "mlpscale.transfer.config")]
)
def test_doc_field_table_is_the_generated_one(doc, module):
    text = (DOCS / doc).read_text()
    assert module in config_fields.doc_table_modules(text), f"docs/{doc} lost its marked {module} field table"
    assert config_fields.regenerate_doc_tables(text) == text, (
        f"docs/{doc}'s field table differs from {module}.fields_table(); regenerate it with: "
        f"{config_fields.REGENERATE_COMMAND}"
    )


@pytest.mark.parametrize("config_class", [PretrainConfig, TransferConfig])
def test_every_field_has_a_description_shown_by_help(config_class):
    descriptions = config_fields.field_help(config_class)
    assert all(descriptions.values()), [name for name, text in descriptions.items() if not text]
    parser = argparse.ArgumentParser()
    (add_config_arguments if config_class is PretrainConfig else add_transfer_arguments)(parser)
    options = {action.dest: action.help for action in parser._actions}
    for name, text in descriptions.items():
        assert options[f"cfg__{name}"].replace("%%", "%").startswith(text), name


def test_choice_lists_are_the_implementations():
    from mlpscale.data.choices import ORDERS, TRAINING_ORDERS
    from mlpscale.model_choices import ACTIVATIONS, NORMALIZATIONS
    from mlpscale.train.choices import OPTIMIZERS, PRECISIONS, SCHEDULES

    pretrain = config_fields.field_choices(PretrainConfig)
    assert (pretrain["optimizer"], pretrain["schedule"], pretrain["precision"]) == (OPTIMIZERS, SCHEDULES, PRECISIONS)
    assert (pretrain["activation"], pretrain["normalization"]) == (ACTIVATIONS, NORMALIZATIONS)
    assert pretrain["order"] == TRAINING_ORDERS and set(TRAINING_ORDERS) < set(ORDERS)
    transfer = config_fields.field_choices(TransferConfig)
    assert transfer["optimizer"] == OPTIMIZERS and transfer["precision"] == PRECISIONS
    assert transfer["schedule"] == ("none", "cosine")


def test_default_resolutions_cover_every_source():
    from mlpscale.data.choices import DEFAULT_RESOLUTIONS
    from mlpscale.data.sources import READERS

    assert set(DEFAULT_RESOLUTIONS) == set(READERS)


def test_user_overrides_are_the_file_then_the_flags_typed(tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text("epochs: 3\nbatch-size: 16\nstorage_path: none\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--batch-size", "32", "--crop-scale", "0.2", "1"])
    assert user_overrides(args) == {"epochs": 3, "batch_size": 32, "storage_path": None, "crop_scale": (0.2, 1.0)}


def test_transfer_flags_then_mode_defaults_fill_what_is_unset(tmp_path):
    config = tmp_path / "probe.yaml"
    config.write_text("mode: linear\nlr_head: 0.001\n")
    parser = argparse.ArgumentParser()
    add_transfer_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(config), "--source", "abc", "--epochs", "2"]))
    assert (cfg.mode, cfg.lr_head, cfg.epochs) == ("linear", 0.001, 2)
    assert (cfg.optimizer, cfg.lr_body, cfg.augment, cfg.job) == ("lion", 0.0, False, "linear_probe")
