"""The names the training code dispatches on, importable without torch (the configs and `--help` read them).

OPTIMIZERS: `optim.build_optimizer`; SCHEDULES: `schedule.lr_factor` / `build_scheduler`;
PRECISIONS: `precision.resolve_precision` (auto picks bf16 where it is native).
"""

OPTIMIZERS = ("lion", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "warmup_cosine")
PRECISIONS = ("auto", "bf16", "fp32")
