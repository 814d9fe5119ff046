"""Class-proportional, seeded, nested training subsets: the data axis of the scaling laws.

One seeded order of the whole train split decides every subset: subset N is its first N
examples. Each class is shuffled once and its j-th example gets the key (j + 0.5) / n_class;
sorting by key interleaves the classes so that every prefix holds each class in proportion
(within one example). Any two subsets are therefore nested, whenever they were written.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mlpscale.errors import MlpscaleError

SUBSET_SEED = 0


def nested_order(labels: np.ndarray, seed: int = SUBSET_SEED) -> np.ndarray:
    """A permutation of the train indices whose every prefix is class-proportional."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    tie_break = rng.random(len(labels))
    return np.lexsort((tie_break, keys))


def check_sizes(sizes: Iterable[int], n_available: int) -> list[int]:
    """Validated, sorted, de-duplicated subset sizes; each must be positive and below the train split's size."""
    checked = []
    for size in sizes:
        try:
            size_int = int(size)
        except (TypeError, ValueError):
            raise MlpscaleError(f"--n-train {size!r} is not an integer; give a number of training examples") from None
        if size_int <= 0:
            raise MlpscaleError(f"--n-train {size_int} must be positive")
        if size_int > n_available:
            raise MlpscaleError(
                f"--n-train {size_int} is larger than the train split ({n_available} examples); "
                f"pick at most {n_available}"
            )
        checked.append(size_int)
    return sorted(set(checked))


def subset_indices(labels: np.ndarray, size: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """Sorted train indices of the nested subset of `size` examples."""
    (size,) = check_sizes([size], len(labels))
    return np.sort(nested_order(labels, seed)[:size])
