"""The lab's data sets as the trainer loads them (entry points ``actgen_trainer.datasets``).

The trainer never imports the lab: ``data.dataset: backgrounds`` is looked up in that entry-point
group (lab/pyproject.toml), which names :func:`backgrounds_images`.
"""

from __future__ import annotations

from actgen_lab.backgrounds import BackgroundsSplit, load_backgrounds_split
from actgen_shared.labels import DIGITS
from actgen_trainer.config import DataConfig
from actgen_trainer.data import ArrayImages, ImageSource, JoinedImages


def backgrounds_images(cfg: DataConfig | None = None) -> tuple[ImageSource, ArrayImages]:
    """The digits on procedural backgrounds, data v3 (:mod:`actgen_lab.backgrounds`), 32 px:
    (train, test).

    The train source's backgrounds are correlated with the class (90 %) and its hard style rare;
    its validation slice (the hard samples' guides) is drawn like the test split, which holds the
    four groups in equal parts. The slice comes with the source (the trainer's ``JoinedImages``),
    so ``data.val_size`` does not apply.
    """
    return _sources(load_split("backgrounds"))


def backgrounds_v2_images(cfg: DataConfig | None = None) -> tuple[ImageSource, ArrayImages]:
    """Data v2: as :func:`backgrounds_images`, but every train image drawn like training, the
    validation slice cut from them by ``data.val_size``."""
    return _sources(load_split("backgrounds-v2"))


def backgrounds_shift_images(cfg: DataConfig | None = None) -> tuple[ImageSource, ArrayImages]:
    """The shift as the deployment: v3's training images, the validation slice and the test split
    all on another class's kind in the hard style (docs/ablation.md 8.9)."""
    return _sources(load_split("backgrounds-shift"))


def backgrounds_shift_100_images(cfg: DataConfig | None = None) -> tuple[ImageSource, ArrayImages]:
    """As :func:`backgrounds_shift_images` with a validation slice of 100 images, not 300: the
    labelled slice of the deployment covers few of its (class, background) pairs
    (docs/ablation.md 8.10)."""
    return _sources(load_split("backgrounds-shift-100"))


# each data set's split, by its name: the trainer's images, the oracle's scenes and the
# diagnostics' groups must be drawn from the same one
SPLITS: dict[str, dict[str, bool | int]] = {
    "backgrounds": {"val_like_test": True},
    "backgrounds-v2": {"val_like_test": False},
    "backgrounds-shift": {"val_like_test": True, "shifted": True},
    "backgrounds-shift-100": {"val_like_test": True, "shifted": True, "val_size": 100},
}


def load_split(dataset: str) -> BackgroundsSplit:
    """The split of the backgrounds data set ``dataset`` (a key of :data:`SPLITS`)."""
    if dataset not in SPLITS:
        raise ValueError(f"{dataset!r} is not a backgrounds data set ({', '.join(SPLITS)})")
    return load_backgrounds_split(**SPLITS[dataset])


def _sources(split: BackgroundsSplit) -> tuple[ImageSource, ArrayImages]:
    train, n_val = split.train, split.n_val
    test = ArrayImages(split.test.images, split.test.labels, DIGITS)
    if not n_val:
        return ArrayImages(train.images, train.labels, DIGITS), test
    head, tail = slice(0, len(train) - n_val), slice(len(train) - n_val, len(train))
    return (
        JoinedImages(
            ArrayImages(train.images[head], train.labels[head], DIGITS),
            ArrayImages(train.images[tail], train.labels[tail], DIGITS),
        ),
        test,
    )
