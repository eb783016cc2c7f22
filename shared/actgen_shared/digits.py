"""The embedded default data set: scikit-learn's 8x8 digits, upscaled to RGB squares.

One split for both sides: the trainer trains and tests on it, and the tiny digits model is
trained and evaluated on the same train/test halves. scikit-learn is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass
class DigitsSplit:
    """uint8 N x S x S x 3 images with integer labels (class names: ``labels.DIGITS``)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(image_size: int = 32) -> DigitsSplit:
    """The digits upscaled to ``image_size`` RGB squares, split by a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the digits data set comes with scikit-learn: pip install scikit-learn") from None

    bunch = load_digits()
    gray = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR)) for g in gray]
    )
    rgb = np.repeat(big[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rgb))
    n_test = int(round(len(rgb) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(rgb[train], labels[train], rgb[test], labels[test])
