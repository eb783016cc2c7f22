"""Classifier, optimizer, schedule and losses of the recipes (Tables 5, 6 and 12).

The architectures come from ``actgen_shared.architectures``: the generator rebuilds uploaded
classifiers from the same registry, so a name means the same network on both sides.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from actgen_shared.architectures import build_classifier
from actgen_shared.run import model_weights
from actgen_shared.schemas import ClassifierMeta
from actgen_trainer.config import Config, OptimConfig
from actgen_trainer.precision import Compute


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    return build_classifier(cfg.model.architecture, num_classes)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule: ``optim.lr`` is stated for ``optim.lr_batch`` images per step."""
    return cfg.lr * global_batch / cfg.lr_batch


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (CIFAR, ImageNet ResNet) or AdamW (ViT); no weight decay on norms/biases.

    ``lr``: the learning rate for the actual global batch (``scaled_lr``); default ``cfg.lr``.
    """
    lr = cfg.lr if lr is None else lr
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(t: float, epochs: int, warmup_epochs: float) -> float:
    """At ``t`` epochs into training (fractional: per iteration), the multiplier of the base lr.

    Linear warmup from 0 to 1 over ``warmup_epochs``, then cosine decay to zero at ``epochs``.
    """
    if t < warmup_epochs:
        return t / warmup_epochs
    span = max(1e-9, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup_epochs) / span)))


class LRSchedule:
    """Per-iteration warmup + cosine (timm's/torch's shape, in closed form).

    The lr is a pure function of the fractional epoch, so it stays right while the training set
    grows (generated images change the iterations per epoch) and a resume needs no state.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, base_lr: float, epochs: int, warmup_epochs: float
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs

    def lr_at(self, t: float) -> float:
        return self.base_lr * lr_factor(t, self.epochs, self.warmup_epochs)

    def set(self, t: float) -> float:
        """Set every group's lr for the step at fractional epoch ``t``; returns it."""
        lr = self.lr_at(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float]:
        return {"base_lr": self.base_lr, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the schedule is recomputed from the config (kept for the format)."""


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, global_batch: int | None = None
) -> LRSchedule:
    """The recipe's schedule on the linearly scaled lr (``global_batch`` None: ``lr_batch``)."""
    base = scaled_lr(cfg, global_batch if global_batch is not None else cfg.lr_batch)
    return LRSchedule(optimizer, base, epochs, cfg.warmup_epochs)


class Loss(nn.Module):
    """Cross-entropy (with label smoothing), focal loss, or CE with misclassified samples upweighted.

    Focal loss: alpha * (1 - p_t)^gamma * CE (Lin et al.; gamma 2, alpha 0.25 in Table 12).
    Weighted CE: samples the model currently gets wrong count ``weighted_ce_factor`` times.
    """

    def __init__(self, cfg: OptimConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=cfg.label_smoothing)
        if cfg.loss == "ce":
            return ce.mean()
        if cfg.loss == "focal":
            p_t = torch.softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
            return (cfg.focal_alpha * (1.0 - p_t).pow(cfg.focal_gamma) * ce).mean()
        wrong = (logits.detach().argmax(dim=1) != targets).float()
        weights = 1.0 + (cfg.weighted_ce_factor - 1.0) * wrong
        return (weights * ce).sum() / weights.sum()


def classifier_payload(model: nn.Module, cfg: Config, num_classes: int) -> tuple[bytes, ClassifierMeta]:
    """The classifier as the generator wants it: safetensors bytes + metadata (never a pickle)."""
    meta = ClassifierMeta(
        architecture=cfg.model.architecture,
        num_classes=num_classes,
        input_size=cfg.data.image_size,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
    )
    return model_weights(model), meta


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: torch.device, compute: Compute | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities N x C, targets N) over a loader, in order.

    ``compute``: autocast and memory format (default: float32, as the tensors come); the
    probabilities stay on the device until the end, one copy to the host instead of one a batch.
    """
    compute = compute or Compute(device)
    model.eval()
    probs, targets = [], []
    for images, labels in loader:
        with compute.autocast():
            logits = model(compute.inputs(images))
        probs.append(torch.softmax(logits.float(), dim=1))
        targets.append(labels)
    return torch.cat(probs).cpu().numpy(), torch.cat(targets).numpy()
