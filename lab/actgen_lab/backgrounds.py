"""Digits on procedural backgrounds (data v2): a testbed where ActGen's mechanisms have room to act.

The 8x8 digits alone leave the method nothing to do: no background for eq. 8's mask to free,
and a test set of 359 images. Here each image is one of scikit-learn's digits, upscaled to a
random side of :data:`DIGIT_SIDE` (20-28 px of the 32, so the class is a large share of the
image), coloured and placed at a random spot on a procedural background of one of ten kinds
(stripes three ways, checks, two gradients, blobs, noise, dots, rings), each with random colours,
frequency and phase, together with the true foreground mask of the digit.

Two stressors, each a distribution shift between training and test:

* **background** (a shortcut): in training a class's background is its own kind (kind = class)
  with probability :data:`MAJORITY_SHARE` (0.9); in test half the images are on their class's
  kind, half on another;
* **style** (a rare appearance): each class has one *hard* style, its digit rotated by the class's
  angle (:data:`HARD_ANGLES`) and drawn with thin strokes; :data:`HARD_SHARE_TRAIN` (5 %) of the
  training images have it, :data:`HARD_SHARE_TEST` (half) of the test images.

The split (everything is deterministic from :data:`SPLIT_SEED`):

* ``train``: each digit of the digits train split once (1438 images), drawn like training. In v3
  (the default, ``val_like_test``; data set ``backgrounds``) :data:`VAL_SIZE` (300) of those digits
  follow, drawn again like the test split (half on another class's kind, half in the hard style):
  the validation slice the hard samples are mined from, which the trainer sees as the tail of its
  train source (``JoinedImages``). In v2 (data set ``backgrounds-v2``) the configs cut the slice
  from the 1438, so it carries the shortcut and the rare style too, and mining found few
  hard-style guides (docs/ablation.md 7.3, 8);
* ``test``: each digit of the digits test split :data:`TEST_RENDERS` times (7180 images), in a
  random order so that any prefix (the loop's per-epoch monitor) is a fair sample of all four groups;
* ``shifted`` (data set ``backgrounds-shift``): as v3, but the validation slice and the test split
  are drawn from the shift alone, every image on another class's kind and in the hard style (the
  group with both stressors): a deployment that meets the rare style on unfamiliar backgrounds, and
  labels its held-out slice from it (docs/ablation.md 8.9). The training images are v3's;
  ``backgrounds-shift-100`` is the same with a slice of 100 (a user who labels a hundred images of
  the deployment; docs/ablation.md 8.10);
* :func:`broad_scenes`: the generator's training pool, every train digit on every kind, the styles
  as rare as in training (like a generator trained on the world: it mostly draws the common look).

Every scene keeps what made it (digit, style, colours, box: :class:`Scenes`), so a scene can be
drawn again with one thing changed (:func:`rerender`): the testbed's oracle generator does that.

Groups (worst-group accuracy, :func:`group_accuracies`): four, background (majority: the class's
own kind; minority: another) x style (common, hard), :data:`GROUPS`; each holds about a quarter of
the test split (~1800 images, a standard error near 1 pp).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from actgen_shared.digits import load_digits_split

IMAGE_SIZE = 32  # px
SPLIT_SEED = 0
MAJORITY_SHARE = 0.9  # train (and v2's validation slice): share of images on their class's own kind
TEST_MAJORITY_SHARE = 0.5  # test: half the images on their class's kind, half on another
SHIFT_MAJORITY_SHARE, SHIFT_HARD_SHARE = 0.0, 1.0  # backgrounds-shift: val and test all minority/hard
HARD_SHARE_TRAIN = 0.05  # train and the generator's pool: share of images in the class's hard style
HARD_SHARE_TEST = 0.5
# the testbed generator's training pool and its judges' pool: half in the hard style, so they learn both
HARD_SHARE_POOL = 0.5
VAL_SIZE = 300  # v3: the validation slice, train digits drawn again like the test split
TEST_RENDERS = 20  # test images per digit of the test split (359 digits -> 7180 images)
DIGIT_SIDE = (20, 28)  # px: the digit's box side, drawn uniformly (inclusive)
PATTERN_CONTRAST = 0.4  # per channel, between a background's two colours (v1: 0.2, too faint a shortcut)
MASK_ALPHA = 0.5  # a pixel is foreground when the digit's opacity there is at least this
# each class's hard style: rotated by this many degrees (counter-clockwise), thin strokes
HARD_ANGLES = (40, -40, 35, -35, 40, -40, 35, -35, 40, -40)
STYLES = ("common", "hard")
GROUPS = ("majority/common", "minority/common", "majority/hard", "minority/hard")
BACKGROUND_KINDS = (
    "h_stripes",
    "v_stripes",
    "d_stripes",
    "checks",
    "linear_gradient",
    "radial_gradient",
    "blobs",
    "noise",
    "dots",
    "rings",
)


@dataclass
class Scenes:
    """Rendered images with what made them: uint8 N x S x S x 3 images, bool N x S x S masks.

    ``digits``, ``styles``, ``colours`` and ``boxes`` are what :func:`rerender` needs to draw a
    scene again (None for scenes built by hand, e.g. in tests).
    """

    images: np.ndarray
    masks: np.ndarray  # the digit's true foreground
    labels: np.ndarray  # digit class, int64
    kinds: np.ndarray  # background kind, int64 index into BACKGROUND_KINDS
    styles: np.ndarray | None = None  # int64 index into STYLES (0 common, 1 hard)
    digits: np.ndarray | None = None  # N x 8 x 8 source digits (grey levels 0..16)
    colours: np.ndarray | None = None  # N x 3 x 3 float: first, second background colour, digit
    boxes: np.ndarray | None = None  # N x 3 int: side, top, left of the digit's box

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concat(first: Scenes, second: Scenes) -> Scenes:
        """``first``'s scenes followed by ``second``'s (both rendered here: every field set)."""

        def join(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return Scenes(
            np.concatenate([first.images, second.images]),
            np.concatenate([first.masks, second.masks]),
            np.concatenate([first.labels, second.labels]),
            np.concatenate([first.kinds, second.kinds]),
            join(first.styles, second.styles),
            join(first.digits, second.digits),
            join(first.colours, second.colours),
            join(first.boxes, second.boxes),
        )

    def take(self, rows: np.ndarray) -> Scenes:
        """The scenes at ``rows`` (every field that is set)."""

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return Scenes(
            self.images[rows],
            self.masks[rows],
            self.labels[rows],
            self.kinds[rows],
            pick(self.styles),
            pick(self.digits),
            pick(self.colours),
            pick(self.boxes),
        )


@dataclass
class BackgroundsSplit:
    """The trainer's train source (class-correlated backgrounds, rare hard style) and test source.

    ``n_val``: the train source's last ``n_val`` scenes are the validation slice, drawn like the
    test split (v3); 0 when the slice is cut from training-like scenes by the config (v2).
    """

    train: Scenes
    test: Scenes
    n_val: int = 0


# ---------------------------------------------------------------------- backgrounds
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x), each S x S float."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _square_wave(phase: np.ndarray, softness: float = 3.0) -> np.ndarray:
    """A soft square wave in [0, 1] of a phase in radians (sharp edges, but not aliased)."""
    return np.clip(0.5 + softness * np.sin(phase), 0.0, 1.0)


def background_pattern(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One kind's S x S blend weights in [0, 1] (0: first colour, 1: second), random frequency and phase."""
    y, x = _grid(size)
    two_pi = 2.0 * np.pi
    phase = rng.uniform(0.0, two_pi)
    if kind in ("h_stripes", "v_stripes", "d_stripes"):
        period = rng.uniform(6.0, 14.0)
        if kind == "h_stripes":
            coord = y
        elif kind == "v_stripes":
            coord = x
        else:
            angle = rng.choice([np.pi / 4, 3 * np.pi / 4]) + rng.uniform(-0.2, 0.2)
            coord = x * np.cos(angle) + y * np.sin(angle)
        return _square_wave(two_pi * coord / period + phase)
    if kind == "checks":
        cell = rng.uniform(4.0, 9.0)
        ox, oy = rng.uniform(0.0, cell, size=2)
        return _square_wave(np.pi * (x + ox) / cell) * _square_wave(np.pi * (y + oy) / cell) + (
            1 - _square_wave(np.pi * (x + ox) / cell)
        ) * (1 - _square_wave(np.pi * (y + oy) / cell))
    if kind == "linear_gradient":
        angle = rng.uniform(0.0, two_pi)
        coord = (x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)
        return np.clip(coord / size + 0.5, 0.0, 1.0)
    if kind == "radial_gradient":
        cy, cx = rng.uniform(0.0, size, size=2)
        radius = rng.uniform(0.6, 1.2) * size
        return np.clip(np.hypot(y - cy, x - cx) / radius, 0.0, 1.0)
    if kind == "blobs":
        field = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0.0, size, size=2)
            sigma = rng.uniform(3.0, 7.0)
            field += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
        return np.clip(field, 0.0, 1.0)
    if kind == "noise":
        cells = int(rng.choice([4, 6, 8]))
        coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        up = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(up, dtype=np.float32), 0.0, 1.0)
    if kind == "dots":
        period = rng.uniform(6.0, 11.0)
        oy, ox = rng.uniform(0.0, period, size=2)
        dy = (y + oy) % period - period / 2
        dx = (x + ox) % period - period / 2
        radius = period * rng.uniform(0.2, 0.35)
        return np.clip(radius + 0.5 - np.hypot(dy, dx), 0.0, 1.0)
    if kind == "rings":
        cy, cx = rng.uniform(0.0, size, size=2)
        period = rng.uniform(6.0, 12.0)
        return _square_wave(two_pi * np.hypot(y - cy, x - cx) / period + phase)
    raise ValueError(f"unknown background kind {kind!r}; known: {', '.join(BACKGROUND_KINDS)}")


def _colours(rng: np.random.Generator, dark_digit: bool | None = None) -> np.ndarray:
    """Two background colours and a digit colour that contrasts with both (3 x 3, RGB in [0, 1]).

    Half the scenes have a light background and a dark digit, half the reverse (``dark_digit``
    fixes which); channels are drawn independently inside each band, so hues vary freely. The
    pattern's second colour is the first moved by at most :data:`PATTERN_CONTRAST` per channel:
    the pattern is plain to see, the digit plainer.
    """
    if dark_digit is None:
        dark_digit = bool(rng.random() < 0.5)
    if dark_digit:  # dark digit on a light background
        bg_low, bg_high, fg_low, fg_high = 0.45, 1.0, 0.0, 0.3
    else:  # light digit on a dark background
        bg_low, bg_high, fg_low, fg_high = 0.0, 0.55, 0.7, 1.0
    first = rng.uniform(bg_low, bg_high, size=3)
    second = np.clip(first + rng.uniform(-PATTERN_CONTRAST, PATTERN_CONTRAST, size=3), bg_low, bg_high)
    digit = rng.uniform(fg_low, fg_high, size=3)
    return np.stack([first, second, digit]).astype(np.float32)


def _new_background_colours(colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fresh background colours for a scene whose digit colour stays (same light/dark scheme)."""
    dark_digit = bool(colours[2].mean() < 0.5)
    fresh = _colours(rng, dark_digit)
    fresh[2] = colours[2]
    return fresh


# ---------------------------------------------------------------------- scenes
def draw_box(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random digit box: side in :data:`DIGIT_SIDE`, top and left inside the image."""
    side = int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    return np.array([side, top, left], np.int64)


def digit_opacity(
    digit: np.ndarray, label: int, style: int, box: np.ndarray, size: int = IMAGE_SIZE
) -> np.ndarray:
    """An 8x8 digit (grey levels 0..16) upscaled into ``box`` (side, top, left): S x S opacity.

    The hard style rotates the digit by its class's angle and keeps only the strokes' cores.
    """
    side, top, left = (int(v) for v in box)
    grey = np.clip(digit.astype(np.float32) / 16.0, 0.0, 1.0)
    big = Image.fromarray(grey, mode="F").resize((side, side), Image.Resampling.BILINEAR)
    if style == 1:
        big = big.rotate(HARD_ANGLES[int(label) % len(HARD_ANGLES)], Image.Resampling.BILINEAR)
        alpha = np.clip((np.asarray(big) - 0.4) * 3.0, 0.0, 1.0)  # thin strokes
    else:
        alpha = np.clip(np.asarray(big) * 1.6 - 0.2, 0.0, 1.0)  # solid strokes, soft edges
    out = np.zeros((size, size), np.float32)
    out[top : top + side, left : left + side] = alpha
    return out


def compose(
    digit: np.ndarray,
    label: int,
    kind: int,
    style: int,
    colours: np.ndarray,
    box: np.ndarray,
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 S x S x 3) and its true foreground mask (bool S x S) from all its parts;
    ``rng`` draws only the background pattern's frequency and phase."""
    weights = background_pattern(BACKGROUND_KINDS[kind], rng, size)[..., None]
    first, second, colour = colours
    background = (1.0 - weights) * first + weights * second
    alpha = digit_opacity(digit, label, style, box, size)[..., None]
    image = (1.0 - alpha) * background + alpha * colour
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), alpha[..., 0] >= MASK_ALPHA


def render_scenes(
    digits: np.ndarray,
    labels: np.ndarray,
    kinds: np.ndarray,
    seed: int,
    size: int = IMAGE_SIZE,
    styles: np.ndarray | None = None,
) -> Scenes:
    """Render ``digits[i]`` (N x 8 x 8) on background kind ``kinds[i]`` in style ``styles[i]``
    (all common when None); colours, box and pattern from one RNG stream from ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(digits)
    styles = np.zeros(n, np.int64) if styles is None else np.asarray(styles, np.int64)
    labels = np.asarray(labels, np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    colours = np.empty((n, 3, 3), np.float32)
    boxes = np.empty((n, 3), np.int64)
    for i in range(n):
        colours[i] = _colours(rng)
        boxes[i] = draw_box(rng, size)
        images[i], masks[i] = compose(
            digits[i], int(labels[i]), int(kinds[i]), int(styles[i]), colours[i], boxes[i], rng, size
        )
    return Scenes(
        images, masks, labels, np.asarray(kinds, np.int64), styles, np.asarray(digits), colours, boxes
    )


def rerender(
    scenes: Scenes,
    index: int,
    rng: np.random.Generator,
    kind: int | None = None,
    new_colours: bool = False,
    size: int = IMAGE_SIZE,
    new_box: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` drawn again: its digit, style, box and digit colour; the background pattern
    redrawn from ``rng`` (new frequency and phase) on ``kind`` (None: its own) with fresh
    background colours when ``new_colours``, the digit moved and resized when ``new_box``.
    (image, mask)."""
    if scenes.digits is None or scenes.colours is None or scenes.boxes is None or scenes.styles is None:
        raise ValueError("these scenes were not rendered here: nothing to draw them again from")
    colours = scenes.colours[index]
    if new_colours:
        colours = _new_background_colours(colours, rng)
    box = draw_box(rng, size) if new_box else scenes.boxes[index]
    return compose(
        scenes.digits[index],
        int(scenes.labels[index]),
        int(scenes.kinds[index] if kind is None else kind),
        int(scenes.styles[index]),
        colours,
        box,
        rng,
        size,
    )


def correlated_kinds(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Background kind per image: its class's own kind (= class) with probability ``share``,
    otherwise one of the other kinds, uniformly."""
    n_kinds = len(BACKGROUND_KINDS)
    labels = np.asarray(labels, np.int64)
    majority = labels % n_kinds
    other = (majority + rng.integers(1, n_kinds, size=len(labels))) % n_kinds
    return np.where(rng.random(len(labels)) < share, majority, other)


def draw_styles(n: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """Style per image: hard (1) with probability ``share``, else common (0)."""
    return (rng.random(n) < share).astype(np.int64)


def _digit_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 8x8 digits (grey levels 0..16) in the train and test halves of ``actgen_shared.digits``."""
    from sklearn.datasets import load_digits  # installed with the digits data set

    bunch = load_digits()
    split = load_digits_split(8)  # the same halves the digits data set uses
    order = np.random.default_rng(SPLIT_SEED).permutation(len(bunch.images))
    n_test = len(split.test_labels)
    test, train = order[:n_test], order[n_test:]
    if not (np.array_equal(bunch.target[train], split.train_labels)):
        raise RuntimeError("the backgrounds split no longer matches the digits split")
    return bunch.images[train], bunch.target[train], bunch.images[test], bunch.target[test]


@lru_cache(maxsize=4)  # every ablation cell loads it; the arrays are shared, never written to
def load_backgrounds_split(
    image_size: int = IMAGE_SIZE,
    test_renders: int = TEST_RENDERS,
    val_like_test: bool = True,
    shifted: bool = False,
    val_size: int = VAL_SIZE,
) -> BackgroundsSplit:
    """The train source (each train digit once: kinds correlated with class, the hard style rare;
    with ``val_like_test`` its last ``val_size`` digits drawn like the test split, the
    validation slice) and the test source (each test digit ``test_renders`` times: half on their
    class's kind, half in the hard style, shuffled; ``shifted``: the slice and the test split all
    on another class's kind in the hard style, the same draws otherwise). ``val_size``: the
    slice's size (its digits the first of one permutation, so a smaller slice's digits are among
    a larger one's)."""
    if shifted and not val_like_test:
        raise ValueError("a shifted split draws its validation slice like its test split (val_like_test)")
    test_majority, test_hard = (
        (SHIFT_MAJORITY_SHARE, SHIFT_HARD_SHARE) if shifted else (TEST_MAJORITY_SHARE, HARD_SHARE_TEST)
    )
    train_digits, train_labels, test_digits, test_labels = _digit_arrays()
    if not 0 < val_size <= len(train_labels):
        raise ValueError(
            f"val_size must be between 1 and {len(train_labels)} (the train digits), got {val_size}"
        )
    rng = np.random.default_rng([SPLIT_SEED, 1])
    train_kinds = correlated_kinds(train_labels, MAJORITY_SHARE, rng)
    train_styles = draw_styles(len(train_labels), HARD_SHARE_TRAIN, rng)
    train = render_scenes(
        train_digits, train_labels, train_kinds, SPLIT_SEED * 1000 + 2, image_size, train_styles
    )
    n_val = val_size if val_like_test else 0
    if val_like_test:  # val_size train digits drawn again, like the test split
        rows = np.sort(np.random.default_rng([SPLIT_SEED, 6]).permutation(len(train_labels))[:n_val])
        rng = np.random.default_rng([SPLIT_SEED, 7])
        val_labels = train_labels[rows]
        val_kinds = correlated_kinds(val_labels, test_majority, rng)
        val_styles = draw_styles(n_val, test_hard, rng)
        val = render_scenes(
            train_digits[rows], val_labels, val_kinds, SPLIT_SEED * 1000 + 8, image_size, val_styles
        )
        train = Scenes.concat(train, val)
    rng = np.random.default_rng([SPLIT_SEED, 3])
    order = rng.permutation(len(test_labels) * test_renders)
    digits = np.repeat(test_digits, test_renders, axis=0)[order]
    labels = np.repeat(test_labels, test_renders)[order]
    test_kinds = correlated_kinds(labels, test_majority, rng)
    test_styles = draw_styles(len(labels), test_hard, rng)
    test = render_scenes(digits, labels, test_kinds, SPLIT_SEED * 1000 + 4, image_size, test_styles)
    return BackgroundsSplit(train=train, test=test, n_val=n_val)


def broad_scenes(
    renders: int, seed: int, image_size: int = IMAGE_SIZE, hard_share: float = HARD_SHARE_TRAIN
) -> Scenes:
    """The generator's training pool: each train digit ``renders`` times, kinds uniform (every
    digit on every kind; no correlation for the generator to learn), the hard style at
    ``hard_share`` (as rare as in training by default)."""
    train_digits, train_labels, _, _ = _digit_arrays()
    digits = np.repeat(train_digits, renders, axis=0)
    labels = np.repeat(train_labels, renders)
    rng = np.random.default_rng([seed, 5])
    kinds = rng.integers(0, len(BACKGROUND_KINDS), size=len(labels))
    styles = draw_styles(len(labels), hard_share, rng)
    return render_scenes(digits, labels, kinds, seed * 1000 + 6, image_size, styles)


# ---------------------------------------------------------------------- groups
def majority_background(scenes: Scenes) -> np.ndarray:
    """True where an image's background is its class's majority kind in training (kind == class)."""
    return scenes.kinds == scenes.labels % len(BACKGROUND_KINDS)


def group_ids(scenes: Scenes) -> np.ndarray:
    """Group of each image, an index into :data:`GROUPS`: 2 * hard style + minority background."""
    styles = np.zeros(len(scenes), np.int64) if scenes.styles is None else scenes.styles
    return 2 * styles + (~majority_background(scenes)).astype(np.int64)


def group_accuracies(correct: np.ndarray, scenes: Scenes) -> dict[str, float]:
    """Accuracy overall, on majority and minority backgrounds, in the common and hard styles, per
    group (``group/majority/common`` ...) and of the worst of the four groups (groups without
    images are left out)."""
    correct = np.asarray(correct, bool)
    groups = group_ids(scenes)
    majority = majority_background(scenes)
    styles = np.zeros(len(scenes), np.int64) if scenes.styles is None else scenes.styles

    def share(rows: np.ndarray) -> float:
        return float(correct[rows].mean()) if rows.any() else float("nan")

    out = {
        "accuracy": float(correct.mean()),
        "majority_accuracy": share(majority),
        "minority_accuracy": share(~majority),
        "common_accuracy": share(styles == 0),
        "hard_accuracy": share(styles == 1),
    }
    per_group = {name: share(groups == g) for g, name in enumerate(GROUPS)}
    out.update({f"group/{name}": value for name, value in per_group.items()})
    out["worst_group_accuracy"] = min(v for v in per_group.values() if not np.isnan(v))
    return out


# ---------------------------------------------------------------------- reference classifier
REFERENCE_FILE = "reference_classifier.safetensors"  # shipped in the testbed's model folder


def _reference_network():  # -> torch.nn.Module
    """A small CNN for 32 px scenes: three conv-BN-ReLU-pool stages, global average, linear."""
    from torch import nn

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *stage(3, 24),
        *stage(24, 48),
        *stage(48, 96),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 10),
    )


def _to_input(images: np.ndarray):  # -> torch.Tensor
    """uint8 N x S x S x 3 -> float N x 3 x S x S in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ReferenceClassifier:
    """Which digit a scene shows, whatever its background or style: a small CNN trained on a broad
    pool (every digit on every kind, half in the hard style, a pool of its own seed), never on
    generated images; the one a model folder ships also learnt the pool's reconstructions through
    that model's VAE (``actgen_lab.tiny_unet_training.train_digit_classifier``, ``actgen-lab
    judges``), so it reads the VAE's images as well as the originals.
    It reads faithfulness (does a generated image still show its guide's class?) in the model
    check and the ablation, as the digits' SVM does there."""

    def __init__(self, module) -> None:  # module: torch.nn.Module
        self.module = module.eval()

    @classmethod
    def fit(cls, x, y, seed: int, epochs: int, batch: int) -> ReferenceClassifier:  # x, y: torch.Tensor
        """The network trained on pixels ``x`` in [-1, 1] to name ``y`` (the digit, or another label
        of a scene such as its background kind), seeded without touching the global RNG."""
        import torch
        import torch.nn.functional as F

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = _reference_network()
            opt = torch.optim.Adam(module.parameters(), lr=3e-3)
            steps = epochs * (len(x) // batch)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
            generator = torch.Generator().manual_seed(seed)
            module.train()
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=generator)
                for i in range(len(x) // batch):
                    idx = order[i * batch : (i + 1) * batch]
                    loss = F.cross_entropy(module(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        return cls(module)

    @classmethod
    def load(cls, path) -> ReferenceClassifier:  # path: str | Path
        """The weights a model folder ships (safetensors: never a pickle)."""
        from safetensors.torch import load_file

        module = _reference_network()
        module.load_state_dict(load_file(str(path)))
        return cls(module)

    def save(self, path) -> None:  # path: str | Path
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, str(path))

    def logits(self, images: np.ndarray, batch: int = 512) -> np.ndarray:
        """N x 10 logits of uint8 N x 32 x 32 x 3 scenes (other sizes are resized to 32 px)."""
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = _to_input(images[i : i + batch])
                if x.shape[-1] != IMAGE_SIZE:
                    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
                out.append(self.module(x))
        return torch.cat(out).numpy() if out else np.zeros((0, 10), np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1)
