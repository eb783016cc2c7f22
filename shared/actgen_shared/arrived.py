"""The images a run has received, as a growing torch Dataset (the client API's default sink).

Each image is kept decoded in memory (resized to ``image_size`` when given, so a long run holds
small arrays) with its provenance; ``dataset[i]`` is ``(image tensor, class id)`` like any
labelled dataset, so it joins a training set with ``ConcatDataset``; ``run.train_dataset(real)``
does that and serves the labels as ``real`` does (int, or a TensorDataset's 0-dim tensors), so
a shuffled batch that mixes both collates. ``dataset.items[i]`` is the
:class:`~actgen_shared.run.Arrival` behind it: job id, epoch, guide id, class id, stream id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from actgen_shared.ledger import Arrival


class ArrivedImages(Dataset):
    """Arrived images, in arrival order; grows as :meth:`ActGenRun.refresh` takes more in.

    ``transform``: PIL image -> tensor, as the real training images get (augmentation,
    normalisation); without it an image is a float C x H x W tensor in [0, 1].
    """

    def __init__(
        self, image_size: int | None = None, transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        self.image_size = image_size
        self.transform = transform
        self.items: list[Arrival] = []
        self._ids: set[str] = set()
        self.label_dtype: torch.dtype | None = None  # None: int labels (see labels_like)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._ids

    def add(self, arrival: Arrival) -> bool:
        """Keep one arrived image (resized to ``image_size``); False when already kept."""
        if arrival.stream_id in self._ids:
            return False
        image = arrival.image
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            pil = Image.fromarray(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arrival = dataclasses.replace(arrival, image=np.array(pil, dtype=np.uint8))
        self.items.append(arrival)
        self._ids.add(arrival.stream_id)
        return True

    def clear(self) -> None:
        self.items, self._ids = [], set()

    def labels(self) -> list[int]:
        return [a.class_id for a in self.items]

    def labels_like(self, dataset: Any) -> None:
        """Serve labels of the type ``dataset`` serves (its first item's): a 0-dim tensor of its
        dtype for a TensorDataset, an int for an ImageFolder, so a batch that mixes both collates."""
        if len(dataset) == 0:
            return
        label = dataset[0][1]
        self.label_dtype = label.dtype if isinstance(label, torch.Tensor) and label.ndim == 0 else None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        """``(image, label)``; the label an int, or a 0-dim tensor after :meth:`labels_like`."""
        arrival = self.items[index]
        label: Any = arrival.class_id
        if self.label_dtype is not None:
            label = torch.tensor(arrival.class_id, dtype=self.label_dtype)
        if self.transform is not None:
            return self.transform(Image.fromarray(arrival.image)), label
        # H x W x 3 uint8 -> 3 x H x W float in [0, 1]
        return torch.from_numpy(arrival.image).permute(2, 0, 1).float().div(255.0), label
