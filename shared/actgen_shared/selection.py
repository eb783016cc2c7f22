"""Hard samples (paper section 4.1, Table 11): what the classifier gets wrong on the slice.

``misclassified``: the arg-max is not the true class. ``threshold``: the true class's softmax
confidence is below a threshold (selects more, and more diverse, samples as it grows).
``lowest_confidence``: the whole slice ranked by true-class confidence, lowest first; the budget
takes distinct guides from the front. With few mistakes left, the other rules repeat a handful
of guides to fill the budget; this one spends it on the next-hardest, near-boundary samples.
``random``: a control, not a rule of the paper: any slice samples, drawn without looking at the
classifier (the ablation's "not mined" guides; the classes come out as the slice has them).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Rule = Literal["misclassified", "threshold", "lowest_confidence", "random"]


def hard_indices(
    probs: np.ndarray,
    targets: np.ndarray,
    rule: Rule = "misclassified",
    threshold: float = 0.5,
) -> np.ndarray:
    """Positions (into ``probs``) of the hard samples: ascending, or hardest first (lowest_confidence)."""
    probs = np.asarray(probs)
    targets = np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(targets):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} do not match")
    if rule == "misclassified":
        mask = probs.argmax(axis=1) != targets
    elif rule == "threshold":
        mask = probs[np.arange(len(targets)), targets] < threshold
    elif rule == "lowest_confidence":
        confidence = probs[np.arange(len(targets)), targets]
        return np.argsort(confidence, kind="stable")
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
    rounds: list[np.ndarray] = []
    while sum(len(r) for r in rounds) < count:
        rounds.append(rng.permutation(hard))
    return np.concatenate(rounds)[:count]


def take_ranked(ranked: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` first of a hardest-first ranking, cycling only when it is shorter than ``count``."""
    ranked = np.asarray(ranked)
    if count <= 0 or len(ranked) == 0:
        return ranked[:0]
    return np.tile(ranked, -(-count // len(ranked)))[:count]


def select_guides(
    probs: np.ndarray,
    targets: np.ndarray,
    rule: Rule,
    threshold: float,
    count: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """One epoch's guides (positions into ``probs``) and how many slice samples are hard.

    ``misclassified`` and ``threshold`` draw from their hard set (:func:`sample_hard`);
    ``lowest_confidence`` takes the hardest first, all distinct (:func:`take_ranked`), and counts
    the misclassified ones as hard.
    """
    if rule == "random":  # the control: unmined guides, every slice sample before any repeats
        hard = hard_indices(probs, targets, "misclassified")
        return sample_hard(np.arange(len(targets)), count, rng), len(hard)
    if rule == "lowest_confidence":
        hard = hard_indices(probs, targets, "misclassified")
        return take_ranked(hard_indices(probs, targets, rule), count), len(hard)
    hard = hard_indices(probs, targets, rule, threshold)
    return sample_hard(hard, count, rng), len(hard)
