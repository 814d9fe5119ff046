"""Search-space files: the shipped ones load, each kind of bad entry is rejected naming the entry (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlpscale.config import PretrainConfig
from mlpscale.errors import MlpscaleError
from mlpscale.tune.space import check_against_config, from_tune_value, load_space, to_tune_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def write_space(tmp_path, entries) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.mark.parametrize("name", ["paper.yaml", "smoke.yaml"])
def test_shipped_spaces_load_and_fit_the_config(name):
    space = load_space(SPACES / name)
    assert {"lr", "batch_size", "label_smoothing", "mixup_alpha"} <= set(space.fields)
    check_against_config(space, PretrainConfig(epochs=4))
    domains = to_tune_space(space)
    assert set(domains) == set(space.fields)
    sampled = {field: domain.sample() for field, domain in domains.items()}
    lr = space.params[space.fields.index("lr")]
    assert lr.low <= sampled["lr"] <= lr.high


def test_every_distribution_kind_is_accepted(tmp_path):
    space = load_space(
        write_space(
            tmp_path,
            {
                "lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
                "label_smoothing": {"distribution": "uniform", "low": 0.0, "high": 0.3},
                "epochs": {"distribution": "int", "low": 2, "high": 3},
                "batch_size": {"distribution": "int", "low": 16, "high": 64, "log": True},
                "optimizer": {"distribution": "choice", "values": ["lion", "adamw"]},
                "mixup_alpha": {"distribution": "grid", "values": [0.0, 0.8]},
                "crop_scale": {"distribution": "choice", "values": [[0.08, 1.0], [0.35, 1.0]]},
            },
        )
    )
    assert space.has_grid and space.grid_size == 2
    domains = to_tune_space(space)
    for _ in range(20):
        assert domains["epochs"].sample() in (2, 3)  # int's high is inclusive
    crop = domains["crop_scale"].sample()
    assert from_tune_value(crop, tuple[float, float]) in ((0.08, 1.0), (0.35, 1.0))


BAD_SPACES = [
    (
        {"learning_rate": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}},
        ["'learning_rate'", "not a pretrain config field", "lr"],
    ),
    ({"lr": {"distribution": "gaussian", "low": 1e-4, "high": 1e-2}}, ["'lr'", "unknown distribution", "loguniform"]),
    ({"lr": {"distribution": "loguniform", "low": 1e-2, "high": 1e-4}}, ["'lr'", "must be smaller than high"]),
    ({"lr": {"distribution": "loguniform", "low": 0.0, "high": 1e-2}}, ["'lr'", "low > 0"]),
    ({"lr": {"distribution": "uniform", "low": "a", "high": 1e-2}}, ["'lr'", "low must be a finite number"]),
    ({"lr": {"distribution": "uniform", "values": [1e-3, 1e-2]}}, ["'lr'", "'values' is only for choice or grid"]),
    ({"lr": {"distribution": "choice", "low": 1e-3, "high": 1e-2}}, ["'lr'", "takes 'values'"]),
    ({"lr": {"distribution": "choice", "values": []}}, ["'lr'", "non-empty list 'values'"]),
    ({"lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2, "step": 2}}, ["'lr'", "unknown key(s) step"]),
    ({"lr": "1e-3"}, ["'lr'", "must be a mapping"]),
    ({"batch_size": {"distribution": "choice", "values": [32, "big"]}}, ["'batch_size'", "'big'", "type int"]),
    ({"batch_size": {"distribution": "uniform", "low": 16, "high": 64}}, ["'batch_size'", "use distribution 'int'"]),
    ({"lr": {"distribution": "int", "low": 1, "high": 3}}, ["'lr'", "needs an integer field"]),
    ({"epochs": {"distribution": "int", "low": 1.5, "high": 3}}, ["'epochs'", "whole number"]),
    (
        {"optimizer": {"distribution": "choice", "values": ["lion", "adam"]}},
        ["'optimizer'", "lion, adamw, sgd", "adam"],
    ),
    ({"arch": {"distribution": "uniform", "low": 1, "high": 2}}, ["'arch'", "not numeric"]),
    ({"experiment": {"distribution": "choice", "values": ["a", "b"]}}, ["'experiment'", "cannot be searched"]),
    ({"mixup_alpha": {"distribution": "grid", "values": [0.8, 0.8]}}, ["'mixup_alpha'", "duplicates"]),
    ([1, 2], ["non-empty mapping"]),
]


@pytest.mark.parametrize("entries,expected", BAD_SPACES, ids=[str(i) for i in range(len(BAD_SPACES))])
def test_bad_space_is_rejected_naming_the_entry(tmp_path, entries, expected):
    with pytest.raises(MlpscaleError) as error:
        load_space(write_space(tmp_path, entries))
    for text in expected:
        assert text in str(error.value)


def test_range_reaching_invalid_config_values_is_rejected(tmp_path):
    space = load_space(write_space(tmp_path, {"label_smoothing": {"distribution": "uniform", "low": 0.0, "high": 1.5}}))
    with pytest.raises(MlpscaleError, match="'label_smoothing' reaches 1.5.*label_smoothing=1.5 must be in"):
        check_against_config(space, PretrainConfig())


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MlpscaleError, match="does not exist.*search_spaces/smoke.yaml"):
        load_space(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: {distribution: [\n")
    with pytest.raises(MlpscaleError, match="not valid YAML"):
        load_space(broken)


def load_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_job", SPACES.parent / "jobs" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_rejects_bad_input_before_any_trial(tmp_path, tracking_uri, capsys):
    job = load_job()
    bad = write_space(tmp_path, {"lr": {"distribution": "loguniform", "low": 1e-2, "high": 1e-4}})
    storage = ["--storage-path", str(tmp_path / "ray")]
    assert job.main(["--space", str(bad), *storage]) == 2
    assert "entry 'lr': low (0.01) must be smaller than high (0.0001)" in capsys.readouterr().err
    assert job.main(["--space", str(SPACES / "smoke.yaml"), "--scheduler", "hyperband", *storage]) == 2
    assert "--scheduler 'hyperband'" in capsys.readouterr().err
    assert job.main(["--space", str(SPACES / "smoke.yaml"), "--trial-retries", "-1", *storage]) == 2
    assert "--trial-retries must be 0 or more; got -1" in capsys.readouterr().err
    assert job.main(["--resume", "--name", "never-ran", *storage]) == 2
    assert "no sweep named 'never-ran'" in capsys.readouterr().err
    assert job.main([]) == 2
    assert "--space" in capsys.readouterr().err
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir())


def test_a_trial_applies_its_sampled_values_to_the_typed_base_config():
    from mlpscale.tune.space import tune_value
    from mlpscale.tune.trial import SweepContext, trial_config

    base = PretrainConfig(epochs=4, batch_size=32, lr=1e-3, experiment="base-exp")
    context = SweepContext(
        sweep_id="s",
        parent_run_id="p",
        tracking_uri="sqlite:///x.db",
        experiment="sweeps",
        base_config=base,
        train_storage="/tmp/train",
        lr_scaling="linear",
        base_batch_size=32,
    )
    sampled = {"lr": 2e-3, "batch_size": 64, "crop_scale": tune_value((0.08, 1.0))}  # as Tune hands them over
    cfg, extra = trial_config(context, sampled)
    assert cfg.crop_scale == (0.08, 1.0) and cfg.batch_size == 64 and cfg.epochs == 4
    assert cfg.lr == pytest.approx(4e-3) and extra == {"lr_scaling": "linear", "base_lr": 2e-3, "base_batch_size": 32}
    assert (cfg.experiment, cfg.tracking_uri) == ("sweeps", "sqlite:///x.db")
    assert base.lr == 1e-3 and base.crop_scale == (0.5, 1.0)  # the base is not changed
    with pytest.raises(MlpscaleError, match="batch_size"):
        trial_config(context, {"batch_size": "many"})
