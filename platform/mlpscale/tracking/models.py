"""Pretrained models as transfer sources: resolve a SOURCE string to weights, architecture and lineage.

A SOURCE is one of
- an MLflow run id (the model the run logged; arch, resolution, ... from its params),
- `models:/name/version`, `models:/name@alias` or `name@alias` (a registered model version;
  its run supplies the architecture),
- `models:/m-...` (a logged model id),
- a checkpoint directory written by the pretrain job (model state + config).
Weights are always loaded into a freshly built mlpscale MLP, so models logged in either
MLflow PyTorch format (pickle or pt2 export) come back with `.features` and `.head`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlpscale.errors import MlpscaleError
from mlpscale.tracking import TAG_JOB, client, load_model, resolve_tracking_uri

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ALIAS = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
LOGGED_MODEL = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")
CHECKPOINT_FILES = ("model.pt", "checkpoint.pt", "state.pt")
ARCH_KEYS = (
    "arch",
    "resolution",
    "num_classes",
    "in_channels",
    "expansion",
    "activation",
    "normalization",
    "final_norm",
)


@dataclass
class SourceModel:
    """A pretrained MLP ready for transfer, and where it came from."""

    model: torch.nn.Module
    arch: str
    resolution: int
    source: str
    run_id: str | None = None
    model_uri: str | None = None
    dataset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> dict[str, Any]:
        """The build_model keywords that rebuild this model (num_classes is the source task's)."""
        return dict(self.model.config)


def resolve_source(source: str, tracking_uri: str | None = None) -> SourceModel:
    """Load the model a SOURCE names (see module docstring); MlpscaleError naming the source otherwise."""
    text = str(source or "").strip()
    if not text:
        raise MlpscaleError(
            "no source given; pass --source RUN_ID, models:/name/version, name@alias or a checkpoint directory"
        )
    path = Path(text).expanduser()
    if path.exists():
        return _from_checkpoint(path, text)
    uri = resolve_tracking_uri(tracking_uri)
    if RUN_ID.match(text):
        return _from_run(text, text, uri)
    if (match := VERSION.match(text)) or (match := ALIAS.match(text)):
        return _from_registry(text, match.groupdict(), uri)
    if match := LOGGED_MODEL.match(text):
        return _from_logged_model(text, match["model_id"], uri)
    if "/" in text or text.startswith((".", "~")):
        raise MlpscaleError(
            f"source {text!r}: no such checkpoint directory; pass an existing directory "
            "written by the pretrain job, a run id, models:/name/version or name@alias"
        )
    raise MlpscaleError(
        f"source {text!r} is neither a run id (32 hex digits), models:/name/version, name@alias "
        "nor an existing checkpoint directory"
    )


def _get_run(mlflow_client, run_id: str, source: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        raise MlpscaleError(
            f"source {source!r}: run {run_id} does not exist in the MLflow store "
            f"{mlflow_client.tracking_uri}; check the run id or set --tracking-uri"
        ) from None


def _run_model_uri(mlflow_client, run, source: str) -> str:
    """The URI of the model a run logged (the one named `model` when it logged several)."""
    import mlflow

    run_id = run.info.run_id
    mlflow.set_tracking_uri(mlflow_client.tracking_uri)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    if not models:
        job = run.data.tags.get(TAG_JOB, "unknown")
        raise MlpscaleError(
            f"source {source!r}: run {run_id} (job {job}) has no logged model; pass a pretraining "
            "run that finished and logged its model, or its checkpoint directory"
        )
    named = [m for m in models if m.name == "model"] or models
    return f"models:/{named[0].model_id}"


def _from_run(source: str, run_id: str, uri: str, model_uri: str | None = None) -> SourceModel:
    mlflow_client = client(uri)
    run = _get_run(mlflow_client, run_id, source)
    model_uri = model_uri or _run_model_uri(mlflow_client, run, source)
    loaded = _load(model_uri, uri, source)
    return _rebuild(loaded, dict(run.data.params), source, run_id=run_id, model_uri=model_uri)


def _from_registry(source: str, parts: Mapping[str, str], uri: str) -> SourceModel:
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    name = parts["name"]
    try:
        if parts.get("alias"):
            version = mlflow_client.get_model_version_by_alias(name, parts["alias"])
        else:
            version = mlflow_client.get_model_version(name, parts["version"])
    except MlflowException:
        raise MlpscaleError(
            f"source {source!r}: no such registered model version in {uri}; list them in the "
            "MLflow UI (Models tab) or register one with the pretrain job's --register"
        ) from None
    model_uri = f"models:/{name}@{parts['alias']}" if parts.get("alias") else f"models:/{name}/{parts['version']}"
    if version.run_id:
        return _from_run(source, version.run_id, uri, model_uri=model_uri)
    return _rebuild(_load(model_uri, uri, source), {}, source, model_uri=model_uri)


def _from_logged_model(source: str, model_id: str, uri: str) -> SourceModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    try:
        logged = mlflow.get_logged_model(model_id)
    except MlflowException:
        raise MlpscaleError(f"source {source!r}: no logged model {model_id} in {uri}") from None
    if logged.source_run_id:
        return _from_run(source, logged.source_run_id, uri, model_uri=source)
    return _rebuild(_load(source, uri, source), {}, source, model_uri=source)


def _load(model_uri: str, uri: str, source: str) -> torch.nn.Module:
    from mlflow.exceptions import MlflowException

    try:
        return load_model(model_uri, uri)
    except (MlflowException, OSError) as error:
        raise MlpscaleError(
            f"source {source!r}: cannot load model {model_uri} ({error}); "
            "pass a run or registered model whose model artifact exists"
        ) from None


def _from_checkpoint(path: Path, source: str) -> SourceModel:
    """A directory holding a state dict (model.pt / checkpoint.pt) and the run's config (JSON or YAML)."""
    import yaml

    folder = path if path.is_dir() else path.parent
    weights = (
        path
        if path.is_file()
        else next((folder / name for name in CHECKPOINT_FILES if (folder / name).is_file()), None)
    )
    if weights is None:
        raise MlpscaleError(
            f"source {source!r}: the directory holds no model weights "
            f"(looked for {', '.join(CHECKPOINT_FILES)}); pass a checkpoint directory "
            "written by the pretrain job"
        )
    state = torch.load(weights, map_location="cpu", weights_only=False)
    config: dict[str, Any] = {}
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        config = dict(state.get("config") or {})
        run_id = state.get("mlflow_run_id") or state.get("run_id")
        if run_id:
            config["run_id"] = run_id
        state = state["model"]
    for name in ("config.json", "config.yaml"):
        file = folder / name
        if file.is_file():
            data = json.loads(file.read_text()) if name.endswith(".json") else yaml.safe_load(file.read_text())
            config = {**(data or {}), **config}
    state = {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in state.items()}
    return _rebuild(state, config, source, run_id=config.get("run_id"))


def _rebuild(
    loaded: torch.nn.Module | Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    source: str,
    run_id: str | None = None,
    model_uri: str | None = None,
) -> SourceModel:
    """Build a fresh MLP from the architecture (params, else the module's own config) and load the weights."""
    from mlpscale.models import build_model

    state = dict(loaded.state_dict() if isinstance(loaded, torch.nn.Module) else loaded)
    arch_config = dict(getattr(loaded, "config", None) or {}) if isinstance(loaded, torch.nn.Module) else {}
    for key in ARCH_KEYS:
        if params.get(key) not in (None, "None", ""):
            arch_config[key] = _parse(params[key])
    if "embed.weight" not in state or "head.weight" not in state:
        raise MlpscaleError(f"source {source!r}: the weights are not an mlpscale MLP (no embed/head layers)")
    arch_config.setdefault("num_classes", int(state["head.weight"].shape[0]))
    arch_config.setdefault("in_channels", 3)
    if not arch_config.get("resolution"):  # a config left at the dataset's default: read it off the weights
        side = math.isqrt(int(state["embed.weight"].shape[1]) // int(arch_config["in_channels"]))
        arch_config["resolution"] = side
    if "arch" not in arch_config or "resolution" not in arch_config:
        raise MlpscaleError(
            f"source {source!r}: cannot tell the architecture (params arch and resolution "
            "missing); pass a pretraining run or a checkpoint with its config"
        )
    keywords = {key: arch_config[key] for key in ARCH_KEYS if key in arch_config and key != "arch"}
    keywords["resolution"] = int(keywords["resolution"])
    keywords["num_classes"] = int(keywords["num_classes"])
    if "final_norm" not in keywords and "norm.weight" in state:
        keywords["final_norm"] = True
    model = build_model(arch_config["arch"], **keywords)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise MlpscaleError(
            f"source {source!r}: weights do not fit {arch_config['arch']} at "
            f"{keywords['resolution']} px ({str(error).splitlines()[0]})"
        ) from None
    log.info(
        "source %s: %s at %d px, %d classes (run %s)",
        source,
        arch_config["arch"],
        keywords["resolution"],
        keywords["num_classes"],
        run_id,
    )
    return SourceModel(
        model=model.eval(),
        arch=str(arch_config["arch"]),
        resolution=keywords["resolution"],
        source=source,
        run_id=run_id,
        model_uri=model_uri,
        dataset=_parse(params.get("dataset")) if params.get("dataset") else None,
        params=dict(params),
    )


def _parse(value: Any) -> Any:
    """MLflow params are strings: turn numbers and booleans back into values."""
    if not isinstance(value, str):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value
