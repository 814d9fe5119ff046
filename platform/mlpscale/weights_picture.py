"""Pictures of the first layer's weights (paper appendix C), logged by pretraining and transfer runs.

Each unit's incoming weights W[:, u] in R^{3hw} are reshaped back to the image layout
(channels, h, w), reduced by the maximum over the channels, and the first 25 units are
drawn as a 5x5 grid: localized, structured filters show up as blobs and edges.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from mlpscale.errors import MlpscaleError

PICTURE_NAME = "first_layer_weights.png"


def first_layer_filters(model: torch.nn.Module, resolution: int, count: int = 25) -> np.ndarray:
    """The first `count` units of `model.embed` as (count, R, R) arrays: max over the input channels."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, torch.nn.Linear):
        raise MlpscaleError(
            f"{type(model).__name__} has no first linear layer `embed`; weight pictures need an mlpscale MLP"
        )
    weight = embed.weight.detach().float().cpu()
    pixels = resolution * resolution
    if weight.shape[1] % pixels:
        raise MlpscaleError(
            f"the first layer takes {weight.shape[1]} inputs, not a multiple of "
            f"{resolution}x{resolution}; pass the resolution the model was trained at"
        )
    channels = weight.shape[1] // pixels
    units = weight[:count].reshape(-1, channels, resolution, resolution)
    return units.amax(dim=1).numpy()


def save_weights_picture(model: torch.nn.Module, resolution: int, path: str | Path, count: int = 25) -> Path:
    """Draw the filters as a square grid (each scaled to its own range) and save the PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filters = first_layer_filters(model, resolution, count)
    side = math.ceil(math.sqrt(count))
    figure, axes = plt.subplots(side, side, figsize=(side * 1.2, side * 1.2))
    for index, axis in enumerate(np.atleast_1d(axes).ravel()):
        axis.set_axis_off()
        if index < len(filters):
            axis.imshow(filters[index], cmap="viridis", interpolation="nearest")
    figure.suptitle(f"first-layer weights, max over channels ({resolution}x{resolution})", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def log_weights_picture(model: torch.nn.Module, resolution: int, run_id: str, tracking_uri: str | None = None) -> str:
    """Save the 5x5 weight picture and log it to the run under plots/; returns the artifact path."""
    from mlpscale import tracking

    with tempfile.TemporaryDirectory() as folder:
        picture = save_weights_picture(model, resolution, Path(folder) / PICTURE_NAME)
        tracking.log_file_artifact(tracking.client(tracking_uri), run_id, picture, "plots")
    return f"plots/{PICTURE_NAME}"
