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
FEATURE_SIDE = 8  # the digits' own resolution: the reference classifier sees 8x8 grey levels


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
        [
            np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.Resampling.BILINEAR))
            for g in gray
        ]
    )
    rgb = np.repeat(big[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rgb))
    n_test = int(round(len(rgb) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(rgb[train], labels[train], rgb[test], labels[test])


def grey_features(images: np.ndarray, side: int = FEATURE_SIDE) -> np.ndarray:
    """uint8 N x H x W x 3 -> N x side*side grey levels in [0, 1], by area averaging (H, W multiples of side)."""
    grey = images.astype(np.float32).mean(-1) / 255.0
    n, h, w = grey.shape
    if h % side or w % side:
        raise ValueError(f"images of {h}x{w} px do not divide into {side}x{side} cells")
    return grey.reshape(n, side, h // side, side, w // side).mean((2, 4)).reshape(n, side * side)


class ReferenceClassifier:
    """An RBF SVM on 8x8 grey levels of the real digits training split: it says which digit a
    generated image shows, and never sees a generated image itself (model checks, the ablation)."""

    def __init__(self, split: DigitsSplit) -> None:
        from sklearn.svm import SVC  # installed with the digits data set (load_digits_split)

        self.model = SVC(C=10.0, gamma="scale")
        self.model.fit(grey_features(split.train_images), split.train_labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(grey_features(images))
