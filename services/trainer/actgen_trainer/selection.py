"""Hard samples (paper section 4.1, Table 11): what the classifier gets wrong on the slice.

``misclassified``: the arg-max is not the true class. ``threshold``: the true class's softmax
confidence is below a threshold (selects more, and more diverse, samples as it grows).
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def hard_indices(
    probs: np.ndarray,
    targets: np.ndarray,
    rule: Literal["misclassified", "threshold"] = "misclassified",
    threshold: float = 0.5,
) -> np.ndarray:
    """Positions (into ``probs``) of the hard samples, ascending."""
    probs = np.asarray(probs)
    targets = np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(targets):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} do not match")
    if rule == "misclassified":
        mask = probs.argmax(axis=1) != targets
    elif rule == "threshold":
        mask = probs[np.arange(len(targets)), targets] < threshold
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return np.flatnonzero(mask)


def sample_hard(hard: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws from ``hard``: without replacement, then fresh permutations when fewer.

    "Repeat with new draws when fewer are hard": every hard sample is used before any repeats,
    and the repeats get new noise in the generator (each item has its own seed).
    """
    hard = np.asarray(hard)
    if count <= 0 or len(hard) == 0:
        return hard[:0]
    rounds = []
    while sum(len(r) for r in rounds) < count:
        rounds.append(rng.permutation(hard))
    return np.concatenate(rounds)[:count]
