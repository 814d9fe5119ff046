"""Hyperparameter sweeps: search-space files, one Ray Train run per Tune trial, Optuna's TPE, MLflow parent and
child runs."""
