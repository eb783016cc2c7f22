"""Mixup / CutMix on training batches (Table 5's ViT-S/16 recipe), through timm.

The mixing acts on a whole batch after it is loaded, so generated images, which are part of the
training set (``data.training_set``), are mixed exactly like real ones. Targets become soft
(label smoothing folded in, rows summing to 1) and the loss is timm's soft-target cross-entropy.
timm draws lambda and the boxes from NumPy's global RNG, which the loop seeds per rank and the
checkpoint saves, so a resumed run mixes as the uninterrupted one would.
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from actgen_trainer.config import Config
from actgen_trainer.models import Loss


class BatchMixer:
    """``(images, labels) -> (mixed images, soft targets)`` for one training batch.

    timm's ``Mixup`` wants an even batch (it pairs element i with element n-1-i); the last,
    odd-out image of a batch (the epoch's remainder with ``drop_last=False``) is left unmixed
    with its smoothed one-hot target, so no image is dropped from training.
    """

    def __init__(self, cfg: Config, num_classes: int) -> None:
        data = cfg.data
        self.num_classes = num_classes
        self.smoothing = cfg.optim.label_smoothing
        self.mixup = Mixup(
            mixup_alpha=data.mixup_alpha,
            cutmix_alpha=data.cutmix_alpha,
            prob=data.mix_prob,
            switch_prob=data.mix_switch_prob,
            mode=data.mix_mode,
            label_smoothing=self.smoothing,
            num_classes=num_classes,
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(images) - len(images) % 2
        if even == len(images):
            return self.mixup(images, labels)
        tail = mixup_target(labels[even:], self.num_classes, 1.0, self.smoothing)
        if even == 0:
            return images, tail
        head, head_targets = self.mixup(images[:even], labels[:even])
        return torch.cat([head, images[even:]]), torch.cat([head_targets, tail])


def build_mixing(cfg: Config, num_classes: int) -> tuple[BatchMixer | None, nn.Module]:
    """(mixer, loss): with ``data.mixup_alpha`` or ``data.cutmix_alpha`` on, the mixer and timm's
    soft-target cross-entropy; else no mixer and ``models.Loss`` on hard labels."""
    if not cfg.data.mixing:
        return None, Loss(cfg.optim)
    return BatchMixer(cfg, num_classes), SoftTargetCrossEntropy()
