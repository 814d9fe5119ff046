"""The activation and normalization names `models.py` builds, importable without torch (configs, `--help`)."""

ACTIVATIONS = ("gelu", "relu")
NORMALIZATIONS = ("layer", "batch", "none")
