"""The lab's data sets as the trainer loads them (entry points ``actgen_trainer.datasets``).

The trainer never imports the lab: ``data.dataset: backgrounds`` is looked up in that entry-point
group (lab/pyproject.toml), which names :func:`backgrounds_images`.
"""

from __future__ import annotations

from actgen_lab.backgrounds import load_backgrounds_split
from actgen_shared.labels import DIGITS
from actgen_trainer.config import DataConfig
from actgen_trainer.data import ArrayImages


def backgrounds_images(cfg: DataConfig | None = None) -> tuple[ArrayImages, ArrayImages]:
    """The digits on procedural backgrounds (:mod:`actgen_lab.backgrounds`), 32 px: (train, test).

    The train source's backgrounds are correlated with the class (90 %) and its hard style rare;
    the test source holds the four groups in equal parts.
    """
    split = load_backgrounds_split()
    return (
        ArrayImages(split.train.images, split.train.labels, DIGITS),
        ArrayImages(split.test.images, split.test.labels, DIGITS),
    )
