"""Test-only fault injection inside Ray Train workers: a training loss that turns NaN after a number of steps.

A test swaps the pretraining loop for `nonfinite_loss_worker(...)` where the launcher looks it up
(`mlpscale.train.loop.train_loop_per_worker`). Ray pickles that wrapper by value (workers cannot
import tests/), and in the worker process it fills `mlpscale.train.steps.LOSS_HOOKS` before running
the real loop, so production code carries no injection parameter.
"""

from __future__ import annotations

import itertools
import sys

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nonfinite_loss_worker(after_steps: int):
    """The pretraining worker function with every training loss NaN from micro-step `after_steps` (0-based) on."""

    def worker(config):
        from mlpscale.train import loop, steps

        count = itertools.count()
        steps.LOSS_HOOKS.append(lambda loss: loss * float("nan") if next(count) >= after_steps else loss)
        return loop.train_loop_per_worker(config)

    return worker
