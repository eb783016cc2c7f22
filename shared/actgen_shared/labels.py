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


@lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    text = resources.files("actgen_shared").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} names, expected 1000"
    return names


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
