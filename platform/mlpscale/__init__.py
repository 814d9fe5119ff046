"""mlpscale: scaling-law research on plain MLPs for vision (B-MLP / S-MLP, FFCV, Ray, MLflow)."""

__version__ = "0.1.0"
