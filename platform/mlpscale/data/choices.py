"""Data names a config may choose, importable without numpy or FFCV (the configs and `--help` read them).

ORDERS: the sample orders `loaders._ffcv_loader` maps onto FFCV's; DEFAULT_RESOLUTIONS: the image side
`prepare.prepare_dataset` converts a dataset at, and so reads it at, when no resolution is given.
"""

ORDERS = ("random", "quasi_random", "sequential")
# Training draws a new order each epoch; sequential (file order) is the evaluation and TTA loaders' order.
TRAINING_ORDERS = tuple(order for order in ORDERS if order != "sequential")

DEFAULT_RESOLUTIONS = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagenet64": 64, "folder": 64}
