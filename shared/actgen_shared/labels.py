"""Bundled label sets: class names used to build prompts ``a photo of {class}``."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Literal, get_args

# The bundled sets by name: the one table the request schema and the trainer config both use.
LabelSetName = Literal["cifar10", "cifar100", "imagenet", "digits"]

CIFAR10 = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CIFAR100 = (
    "apple",
    "aquarium fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak tree",
    "orange",
    "orchid",
    "otter",
    "palm tree",
    "pear",
    "pickup truck",
    "pine tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow tree",
    "wolf",
    "woman",
    "worm",
)

# The digits set scikit-learn ships (8x8 handwritten digits): the embedded default dataset.
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _bundled_lines(name: str) -> tuple[str, ...]:
    text = resources.files("actgen_shared").joinpath(name).read_text("utf-8")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(lines) == 1000, f"{name} has {len(lines)} lines, expected 1000"
    return lines


@lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    """ImageNet-1k's class names in class-index order (the order of the sorted synset ids)."""
    return _bundled_lines("imagenet_classes.txt")


@lru_cache(maxsize=1)
def imagenet_wnids() -> dict[str, str]:
    """ImageNet-1k synset id (the folder names of its train/ and val/, n01440764 ...) -> class name.

    imagenet_wnids.txt lists the 1000 synset ids in class-index order (timm's
    ``imagenet_synsets.txt``), so its line k is the synset of imagenet_classes.txt's line k.
    """
    return dict(zip(_bundled_lines("imagenet_wnids.txt"), _imagenet(), strict=True))


LABEL_SETS: dict[str, tuple[str, ...] | Callable[[], tuple[str, ...]]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "digits": DIGITS,
    "imagenet": _imagenet,
}
if set(LABEL_SETS) != set(get_args(LabelSetName)):
    raise RuntimeError("LABEL_SETS and LabelSetName name different label sets")


def class_names_for(label_set: str) -> list[str]:
    """Names of a bundled label set; KeyError names the unknown set."""
    try:
        source = LABEL_SETS[label_set]
    except KeyError:
        raise KeyError(f"unknown label set {label_set!r}; known: {sorted(LABEL_SETS)}") from None
    return list(source() if callable(source) else source)
