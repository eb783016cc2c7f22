"""Hard-sample selection (paper 4.1, Table 11) on a classifier whose mistakes are known."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from actgen_trainer.models import predict
from actgen_trainer.selection import hard_indices, sample_hard, select_guides, take_ranked


def _fixed_classifier(num_classes: int) -> nn.Module:
    """Predicts the class whose one-hot feature is largest: argmax(x) (identity weights)."""
    model = nn.Linear(num_classes, num_classes, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(num_classes) * 4.0)
    return model


def test_selects_exactly_the_misclassified_indices() -> None:
    rng = np.random.default_rng(3)
    n, classes = 200, 5
    shown = rng.integers(0, classes, n)  # the class the input looks like (the prediction)
    targets = shown.copy()
    flipped = rng.choice(n, 37, replace=False)
    targets[flipped] = (shown[flipped] + rng.integers(1, classes, 37)) % classes
    inputs = torch.nn.functional.one_hot(torch.as_tensor(shown), classes).float()
    loader = DataLoader(TensorDataset(inputs, torch.as_tensor(targets)), batch_size=16)

    probs, got_targets = predict(_fixed_classifier(classes), loader, torch.device("cpu"))
    hard = hard_indices(probs, got_targets, "misclassified")

    assert np.array_equal(got_targets, targets)
    assert np.array_equal(hard, np.sort(flipped))


def test_threshold_selects_low_true_class_confidence() -> None:
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.6, 0.4]])
    targets = np.array([0, 0, 1, 1])
    assert hard_indices(probs, targets, "threshold", 0.5).tolist() == [3]
    assert hard_indices(probs, targets, "threshold", 0.6).tolist() == [1, 3]
    assert hard_indices(probs, targets, "misclassified").tolist() == [3]


def test_sampling_uses_every_hard_sample_before_repeating() -> None:
    hard = np.array([4, 9, 17])
    picked = sample_hard(hard, 8, np.random.default_rng(0))
    assert len(picked) == 8
    assert sorted(picked[:3].tolist()) == [4, 9, 17]
    assert sorted(picked[3:6].tolist()) == [4, 9, 17]
    assert set(picked.tolist()) == {4, 9, 17}


def test_sampling_without_repeats_when_enough_and_reproducible() -> None:
    hard = np.arange(100)
    a = sample_hard(hard, 10, np.random.default_rng([1, 2]))
    b = sample_hard(hard, 10, np.random.default_rng([1, 2]))
    assert len(set(a.tolist())) == 10
    assert np.array_equal(a, b)
    assert len(sample_hard(np.array([], dtype=np.int64), 5, np.random.default_rng(0))) == 0


def test_lowest_confidence_takes_distinct_guides_hardest_first() -> None:
    # true-class confidences 0.9, 0.6, 0.55, 0.1, 0.55, 0.7: one mistake (row 3), a tie (rows 2, 4)
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.9, 0.1], [0.45, 0.55], [0.3, 0.7]])
    targets = np.array([0, 1, 1, 1, 1, 1])
    ranked = hard_indices(probs, targets, "lowest_confidence")
    assert ranked.tolist() == [3, 2, 4, 1, 5, 0]  # ties keep slice order
    assert hard_indices(probs, targets, "misclassified").tolist() == [3]
    # misclassified would spend a budget of 4 on guide 3 four times; this rule on 4 distinct guides
    rng = np.random.default_rng(0)
    assert select_guides(probs, targets, "misclassified", 0.5, 4, rng)[0].tolist() == [3, 3, 3, 3]
    picked, n_hard = select_guides(probs, targets, "lowest_confidence", 0.5, 4, rng)
    assert picked.tolist() == [3, 2, 4, 1] and n_hard == 1  # hard still counts the mistakes
    again = select_guides(probs, targets, "lowest_confidence", 0.5, 4, np.random.default_rng(99))[0]
    assert again.tolist() == picked.tolist()  # no draw


def test_lowest_confidence_cycles_only_when_the_slice_is_smaller_than_the_budget() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    ranked = hard_indices(probs, np.array([0, 0]), "lowest_confidence")
    assert take_ranked(ranked, 5).tolist() == [0, 1, 0, 1, 0]
    assert len(take_ranked(ranked, 0)) == 0


def test_lowest_confidence_is_a_config_choice() -> None:
    from actgen_trainer.config import load_config

    cfg = load_config(None, ["generation.selection=lowest_confidence"])
    assert cfg.generation.selection == "lowest_confidence"
