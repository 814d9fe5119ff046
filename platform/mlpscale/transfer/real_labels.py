"""ImageNet-ReaL evaluation: the reassessed-labels file and the accuracy it defines (Beyer et al., 2020).

The file is a JSON list with one entry per validation image, in file-name order: the
list of acceptable class indices for that image; an empty list leaves the image out.
A prediction is correct when it is in the image's list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mlpscale.errors import MlpscaleError


def load_real_labels(path: str | Path, num_images: int, num_classes: int | None = None) -> list[list[int]]:
    """Read and check a ReaL file against the validation set it is meant for."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MlpscaleError(f"ReaL labels file {path} does not exist; pass --real-labels with the path of real.json")
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MlpscaleError(
            f"ReaL labels file {path} is not valid JSON ({error}); it must be a list of lists of "
            "class indices, one per validation image"
        ) from None
    if not isinstance(labels, list) or not all(isinstance(entry, list) for entry in labels):
        raise MlpscaleError(
            f"ReaL labels file {path} must be a JSON list of lists of class indices, one list per validation image"
        )
    if len(labels) != num_images:
        raise MlpscaleError(
            f"ReaL labels file {path} has {len(labels)} entries but the validation set has "
            f"{num_images} images; use the file made for this validation set (one entry per image, "
            "in file-name order)"
        )
    for index, entry in enumerate(labels):
        for label in entry:
            if (
                not isinstance(label, int)
                or isinstance(label, bool)
                or label < 0
                or (num_classes is not None and label >= num_classes)
            ):
                limit = f" in [0, {num_classes})" if num_classes is not None else ""
                raise MlpscaleError(
                    f"ReaL labels file {path}: entry {index} holds {label!r}; labels must be class indices{limit}"
                )
    return labels


def real_top1(predictions: torch.Tensor | Sequence[int], labels: list[list[int]]) -> float:
    """Fraction of the labelled images whose predicted class is among their acceptable ones."""
    predictions = torch.as_tensor(predictions).tolist()
    if len(predictions) != len(labels):
        raise MlpscaleError(
            f"{len(predictions)} predictions for {len(labels)} ReaL entries; "
            "evaluate the whole validation set in its stored order"
        )
    scored = [(prediction in entry) for prediction, entry in zip(predictions, labels) if entry]
    if not scored:
        raise MlpscaleError("the ReaL labels file leaves every image out (all lists are empty)")
    return sum(scored) / len(scored)
