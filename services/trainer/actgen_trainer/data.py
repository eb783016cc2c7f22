"""Datasets: real images (digits, CIFAR, image folders), the validation slice, generated images.

Every source serves PIL images plus integer targets, so the same transforms, the same hard-sample
selection and the same training set apply to all of them. Generated images live on disk under the
run folder (PNG + ``index.jsonl``), so a resumed run sees exactly the images the checkpoint saw.

The training loader is built once per run (persistent workers) while the training set changes
every epoch (generated images join, the validation slice merges back): its sampler,
:class:`EpochSampler`, reads the set when an epoch starts and hands the workers
:class:`SampleKey` s that name each image outright, so a worker's copy of the dataset, made when
it started, never goes stale (:class:`TrainingImages`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Sampler, get_worker_info

from actgen_shared.codecs import png_encode
from actgen_shared.digits import load_digits_split
from actgen_shared.labels import DIGITS, class_names_for
from actgen_trainer.class_names import ClassNamesError, class_names
from actgen_trainer.config import DATASETS_GROUP, DataConfig

MAX_GUIDE_SIDE = 512  # guides larger than this are shrunk before posting


class DataError(ValueError):
    """A dataset that cannot be loaded as configured; the message says what to do."""


class ImageSource(Protocol):
    """Indexable images with integer labels and class names."""

    classes: list[str]

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...

    def target(self, index: int) -> int: ...


class ArrayImages:
    """Images held in memory as a uint8 N x H x W x 3 array (digits, CIFAR)."""

    def __init__(
        self, images: np.ndarray, targets: Sequence[int] | np.ndarray, classes: Sequence[str]
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"ArrayImages wants uint8 N x H x W x 3, got {images.dtype} {images.shape}")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def target(self, index: int) -> int:
        return int(self.targets[index])


class FolderImages:
    """A folder of class subfolders (torchvision ImageFolder layout), read lazily.

    ``class_to_idx``: the train folder's classes, for a validation or test folder, so that a
    class id means the same class in every folder (a folder may lack some classes, never add
    one). ``classes`` are the folder names until the caller names them (actgen_trainer.class_names).
    """

    def __init__(self, root: Path, class_to_idx: dict[str, int] | None = None) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        try:
            folders, own = find_classes(str(root))
        except FileNotFoundError as exc:  # no class subfolder at all
            raise DataError(f"image folder {root}: {exc}") from None
        if class_to_idx is not None:
            unknown = sorted(set(folders) - set(class_to_idx))
            if unknown:
                raise DataError(
                    f"image folder {root} has class folders the train folder lacks: {unknown[:5]}"
                )
        self.class_to_idx = own if class_to_idx is None else class_to_idx
        try:
            self.samples = make_dataset(
                str(root), self.class_to_idx, IMG_EXTENSIONS, allow_empty=class_to_idx is not None
            )
        except FileNotFoundError as exc:  # a train class folder without images
            raise DataError(f"image folder {root}: {exc}") from None
        self.targets = np.asarray([target for _, target in self.samples], dtype=np.int64)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as img:
            return img.convert("RGB")

    def target(self, index: int) -> int:
        return int(self.targets[index])


class JoinedImages:
    """The train folder followed by the validation folder (``data.val_folder``), as one source:
    the validation slice is its tail, merged into training at mid-training as any slice."""

    def __init__(self, train: ImageSource, val: ImageSource) -> None:
        self.train, self.val = train, val
        self.classes = train.classes

    def __len__(self) -> int:
        return len(self.train) + len(self.val)

    def image(self, index: int) -> Image.Image:
        n = len(self.train)
        return self.train.image(index) if index < n else self.val.image(index - n)

    def target(self, index: int) -> int:
        n = len(self.train)
        return self.train.target(index) if index < n else self.val.target(index - n)


def digits_images(image_size: int = 32) -> tuple[ArrayImages, ArrayImages]:
    """scikit-learn's 8x8 digits, upscaled to RGB ``image_size`` squares: (train, test)."""
    split = load_digits_split(image_size)
    return (
        ArrayImages(split.train_images, split.train_labels, DIGITS),
        ArrayImages(split.test_images, split.test_labels, DIGITS),
    )


def plugin_sources(cfg: DataConfig) -> tuple[ImageSource, ImageSource]:
    """A data set another package registers (entry-point group :data:`DATASETS_GROUP`): the lab's
    ``backgrounds`` testbed (lab/pyproject.toml). The trainer never imports that package by name."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=DATASETS_GROUP)}
    if cfg.dataset not in found:
        raise DataError(
            f"data.dataset={cfg.dataset} comes from a package that registers it in the entry-point group "
            f"{DATASETS_GROUP!r} (backgrounds: the lab, pip install -e ./lab; make setup does); "
            f"registered here: {', '.join(sorted(found)) or 'none'}"
        )
    return found[cfg.dataset].load()(cfg)


def _cifar(cfg: DataConfig, hundred: bool) -> tuple[ArrayImages, ArrayImages]:
    from torchvision.datasets import CIFAR10, CIFAR100

    if cfg.root is None:
        raise DataError(f"data.root is required for {cfg.dataset}: the folder with the CIFAR files")
    cls = CIFAR100 if hundred else CIFAR10
    try:
        train = cls(cfg.root, train=True, download=cfg.download)
        test = cls(cfg.root, train=False, download=cfg.download)
    except RuntimeError as exc:
        raise DataError(
            f"{cfg.dataset} not found under {cfg.root} ({exc}); "
            "put the python-version files there or run with --set data.download=true"
        ) from None
    names = class_names_for("cifar100" if hundred else "cifar10")
    return ArrayImages(train.data, train.targets, names), ArrayImages(test.data, test.targets, names)


def load_sources(cfg: DataConfig, prompts: bool = True) -> tuple[ImageSource, ImageSource]:
    """(train, test) sources for the configured dataset, classes named for the prompts.

    ``prompts``: the class names go into the generator's prompts (generation on, no label set),
    so a folder named only by an id is an error (actgen_trainer.class_names).
    """
    if cfg.dataset == "digits":
        train, test = digits_images(cfg.image_size)
    elif cfg.dataset in ("cifar10", "cifar100"):
        train, test = _cifar(cfg, cfg.dataset == "cifar100")
    elif cfg.dataset in ("imagefolder", "imagenet"):
        return _folders(cfg, prompts)
    else:
        train, test = plugin_sources(cfg)  # type: ignore[assignment]  # ArrayImages in practice
    if cfg.class_names is not None:
        train.classes = test.classes = _named(train.classes, cfg, prompts)
    return train, test


def _folders(cfg: DataConfig, prompts: bool) -> tuple[ImageSource, ImageSource]:
    """imagefolder / imagenet: root/train_folder, root/test_folder and maybe root/val_folder."""
    if cfg.root is None:
        raise DataError(
            f"data.root is required for {cfg.dataset}: the folder holding "
            f"{cfg.train_folder}/ and {cfg.test_folder}/ (one subfolder per class in each)"
        )
    root = Path(cfg.root)
    train = FolderImages(root / cfg.train_folder)
    test = FolderImages(root / cfg.test_folder, train.class_to_idx)
    names = _named(train.classes, cfg, prompts)
    source: ImageSource = train
    if cfg.val_folder is not None:
        val = FolderImages(root / cfg.val_folder, train.class_to_idx)
        if not len(val):
            raise DataError(f"data.val_folder: {root / cfg.val_folder} holds no images")
        source = JoinedImages(train, val)
    source.classes = test.classes = names
    return source, test


def _named(folders: list[str], cfg: DataConfig, prompts: bool) -> list[str]:
    try:
        return class_names(folders, cfg.class_names, prompts)
    except ClassNamesError as exc:
        raise DataError(str(exc)) from None


@dataclass(frozen=True)
class Partition:
    """Indices into the real train source: what trains, and the held-out validation slice."""

    train: np.ndarray
    val: np.ndarray


def partition(n: int, val_size: float, seed: int, subset: int | None = None) -> Partition:
    """Split ``n`` train images into train / validation slice, reproducibly from ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    if subset is not None:
        order = order[: min(subset, n)]
    n_val = int(val_size) if val_size >= 1 else int(round(len(order) * val_size))
    if not 1 <= n_val < len(order):
        raise DataError(
            f"data.val_size={val_size} gives a validation slice of {n_val} out of {len(order)} images"
        )
    return Partition(train=np.sort(order[n_val:]), val=np.sort(order[:n_val]))


def split_train(source: ImageSource, cfg: DataConfig, seed: int) -> Partition:
    """The validation slice: ``data.val_folder``'s images when set, else ``data.val_size`` of the
    train images (drawn from ``seed``); ``data.train_subset`` limits the train images either way."""
    if isinstance(source, JoinedImages):
        n = len(source.train)
        order = np.random.default_rng(seed).permutation(n)[: cfg.train_subset]
        return Partition(train=np.sort(order), val=np.arange(n, len(source)))
    return partition(len(source), cfg.val_size, seed, cfg.train_subset)


def transforms_for(cfg: DataConfig, train: bool):  # -> torchvision transform
    """The recipe's augmentations (crop+flip for CIFAR, random-resized crop for ImageNet).

    ImageNet with ``randaugment`` or ``random_erasing``: timm's training transform (the DeiT /
    ViT recipe of Table 5), which draws from Python's and torch's RNGs, seeded per rank.
    """
    from torchvision import transforms as T

    size = cfg.image_size
    if train and cfg.augment == "imagenet" and (cfg.randaugment or cfg.random_erasing):
        from timm.data import create_transform

        return create_transform(
            size,
            is_training=True,
            auto_augment=cfg.randaugment,
            re_prob=cfg.random_erasing,
            interpolation="bicubic",
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
    ops: list = []
    if cfg.augment == "imagenet":
        ops += (
            [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
        )
    else:
        ops.append(T.Resize((size, size)))
        if train and cfg.augment in ("crop", "crop_flip"):
            ops.append(T.RandomCrop(size, padding=max(1, size // 8)))
        if train and cfg.augment == "crop_flip":
            ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(ops)


class Subset(Dataset):
    """Some indices of a source, as (tensor, label, position) through a transform."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray, transform) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[position])
        return self.transform(self.source.image(index)), self.source.target(index)

    def targets(self) -> np.ndarray:
        return np.asarray([self.source.target(int(i)) for i in self.indices], dtype=np.int64)


def guide_png(image: Image.Image) -> bytes:
    """A real image as the PNG posted as a guide (shrunk if larger than MAX_GUIDE_SIDE)."""
    if max(image.size) > MAX_GUIDE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_GUIDE_SIDE, MAX_GUIDE_SIDE))
    return png_encode(np.asarray(image.convert("RGB"), dtype=np.uint8))


@dataclass
class GeneratedRecord:
    """One generated image folded into the training set (one line of index.jsonl)."""

    id: str  # the results-stream id: unique, so nothing is folded twice
    job_id: str
    index: int
    epoch: int  # the epoch whose hard samples guided it
    class_id: int
    guide_id: str | None
    file: str  # relative to the GeneratedSet root
    sha256: str
    folded_before_epoch: int  # first epoch that trained on it


class GeneratedSet(Dataset):
    """Generated images kept on disk as PNG + ``index.jsonl``, served as a training Dataset."""

    INDEX = "index.jsonl"

    def __init__(self, root: Path, image_size: int, classes: Sequence[str], transform=None) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.classes = list(classes)
        self.transform = transform
        self.records: list[GeneratedRecord] = []
        self._ids: set[str] = set()
        (self.root / "images").mkdir(parents=True, exist_ok=True)

    # --- ImageSource -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> Image.Image:
        with Image.open(self.root / self.records[index].file) as img:
            return img.convert("RGB")

    def target(self, index: int) -> int:
        return self.records[index].class_id

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.transform is None:
            raise RuntimeError("GeneratedSet has no transform")
        return self.transform(self.image(index)), self.target(index)

    # --- folding ---------------------------------------------------------------------------
    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._ids

    def add(
        self,
        stream_id: str,
        job_id: str,
        index: int,
        epoch: int,
        class_id: int,
        guide_id: str | None,
        image: np.ndarray,
        folded_before_epoch: int,
    ) -> GeneratedRecord | None:
        """Resize to the dataset resolution, write the PNG, append the record; None if known."""
        if stream_id in self._ids:
            return None
        if not 0 <= class_id < len(self.classes):
            raise DataError(
                f"generated item {stream_id} has class {class_id} outside 0..{len(self.classes) - 1}"
            )
        pil = Image.fromarray(image).convert("RGB")
        if pil.size != (self.image_size, self.image_size):
            pil = pil.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        data = png_encode(np.asarray(pil, dtype=np.uint8))
        name = f"images/{len(self.records):07d}.png"
        tmp = self.root / f"{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
        record = GeneratedRecord(
            id=stream_id,
            job_id=job_id,
            index=index,
            epoch=epoch,
            class_id=class_id,
            guide_id=guide_id,
            file=name,
            sha256=hashlib.sha256(data).hexdigest(),
            folded_before_epoch=folded_before_epoch,
        )
        with open(self.root / self.INDEX, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(record)) + "\n")
        self.records.append(record)
        self._ids.add(stream_id)
        return record

    # --- checkpointing ---------------------------------------------------------------------
    def state(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def restore(self, records: list[dict]) -> None:
        """Return to a checkpoint's records: the index file is rewritten to exactly these."""
        self.records = [GeneratedRecord(**r) for r in records]
        self._ids = {r.id for r in self.records}
        for r in self.records:
            if not (self.root / r.file).is_file():
                raise DataError(f"generated image {self.root / r.file} from the checkpoint is missing")
        tmp = self.root / f"{self.INDEX}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.root / self.INDEX)

    def reload(self) -> None:
        """Re-read the index from disk (DDP ranks other than 0 follow rank 0's folding)."""
        path = self.root / self.INDEX
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        self.records = [GeneratedRecord(**json.loads(line)) for line in lines if line.strip()]
        self._ids = {r.id for r in self.records}

    def counts_by_epoch_class(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for r in self.records:
            out[(r.epoch, r.class_id)] = out.get((r.epoch, r.class_id), 0) + 1
        return out


def training_set(
    source: ImageSource, indices: np.ndarray, generated: GeneratedSet, transform
) -> ConcatDataset:
    """Real images at ``indices`` plus every generated image so far."""
    generated.transform = transform
    parts: list[Dataset] = [Subset(source, indices, transform)]
    if len(generated):
        parts.append(generated)
    return ConcatDataset(parts)


@dataclass(frozen=True)
class SampleKey:
    """One training image as an epoch's sampler names it: all a loader worker needs to load it.

    ``seed`` is the epoch's worker seed: a worker reseeds its RNGs from it when the first key of a
    new epoch reaches it, so its augmentations do not depend on how many epochs it has lived
    through, and a resumed run draws what an uninterrupted one does.
    """

    epoch: int
    seed: int
    real: int = -1  # index into the real source; -1: a generated image
    file: str = ""  # a generated image: its path under the generated set's root
    class_id: int = -1  # a generated image: its label


class TrainingImages(Dataset):
    """Real and generated training images by :class:`SampleKey` (map-style: the key is the index)."""

    def __init__(self, source: ImageSource, generated_root: Path, transform) -> None:
        self.source = source
        self.generated_root = Path(generated_root)
        self.transform = transform
        self._epoch: int | None = None  # the epoch this worker last reseeded for

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        self._reseed_worker(key)
        if key.real >= 0:
            return self.transform(self.source.image(key.real)), self.source.target(key.real)
        with Image.open(self.generated_root / key.file) as img:
            return self.transform(img.convert("RGB")), key.class_id

    def _reseed_worker(self, key: SampleKey) -> None:
        """In a loader worker, at an epoch's first key: python, numpy and torch RNGs from its seed
        (as torch seeds a fresh worker: the base seed plus the worker id). The main process
        (``num_workers`` 0) draws from its own RNGs, which the checkpoint carries."""
        info = get_worker_info()
        if info is None or self._epoch == key.epoch:
            return
        self._epoch = key.epoch
        seed = (key.seed + info.id) % 2**63
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


class EpochSampler(Sampler[SampleKey]):
    """An epoch's training keys on this rank: the real indices given, then every generated image
    so far, shuffled.

    :meth:`set_epoch` reads the generated set, so what was folded since the last epoch joins.
    The order is the one a fresh ``DataLoader(shuffle=True, generator=...)`` drew: from the
    epoch's generator (``epoch_seed(epoch)``), first the workers' base seed, then the permutation;
    under DDP the permutation is a ``DistributedSampler``'s (``shuffle_seed``, the same on every
    rank) and this rank's shard of it.
    """

    def __init__(
        self,
        generated: GeneratedSet,
        epoch_seed: Callable[[int], int],
        rank: int = 0,
        world: int = 1,
        shuffle_seed: int = 0,
        size: int | None = None,
    ) -> None:
        self.generated = generated
        self.size = size
        self.epoch_seed = epoch_seed
        self.rank, self.world, self.shuffle_seed = rank, world, shuffle_seed
        self.epoch = 0
        self.real = np.zeros(0, dtype=np.int64)
        self.records: list[GeneratedRecord] = []

    def set_epoch(self, epoch: int, real: np.ndarray) -> None:
        """This epoch's real indices, and the generated images folded so far."""
        self.epoch = epoch
        self.real = np.asarray(real, dtype=np.int64)
        self.records = list(self.generated.records)

    @property
    def total(self) -> int:
        """Images in this epoch's training set (all ranks)."""
        return len(self.real) + len(self.records)

    def __len__(self) -> int:
        return -(-(self.size or self.total) // self.world)  # DistributedSampler pads to an equal share

    def __iter__(self) -> Iterator[SampleKey]:
        generator = torch.Generator().manual_seed(self.epoch_seed(self.epoch))
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
        if self.world > 1:
            shards: DistributedSampler[int] = DistributedSampler(
                range(self.total),  # type: ignore[arg-type]  # any sized sequence serves
                num_replicas=self.world,
                rank=self.rank,
                seed=self.shuffle_seed,
            )
            shards.set_epoch(self.epoch)
            order = list(shards)
        else:
            order = torch.randperm(self.total, generator=generator).tolist()
        if self.size is not None and order:  # cut or cycled to the fixed size (this rank's share)
            order = (order * -(-len(self) // len(order)))[: len(self)]
        n_real = len(self.real)
        for position in order:
            if position < n_real:
                yield SampleKey(self.epoch, seed, real=int(self.real[position]))
            else:
                record = self.records[position - n_real]
                yield SampleKey(self.epoch, seed, file=record.file, class_id=record.class_id)
