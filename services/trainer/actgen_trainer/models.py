"""Classifier, optimizer, schedule and losses of the recipes (Tables 5, 6 and 12).

The architectures come from ``actgen_shared.architectures``: the generator rebuilds uploaded
classifiers from the same registry, so a name means the same network on both sides.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F

from actgen_shared.architectures import build_classifier
from actgen_shared.schemas import ClassifierMeta

from actgen_trainer.config import Config, OptimConfig


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    return build_classifier(cfg.model.architecture, num_classes)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (CIFAR, ImageNet ResNet) or AdamW (ViT); no weight decay on norms/biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(epoch: int, epochs: int, warmup_epochs: int) -> float:
    """Linear warmup over ``warmup_epochs``, then cosine decay to zero at ``epochs``."""
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(1, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch (the training set grows as generated images arrive)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, epochs, cfg.warmup_epochs)
    )


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


def classifier_payload(
    model: nn.Module, cfg: Config, num_classes: int
) -> tuple[bytes, ClassifierMeta]:
    """The classifier as the generator wants it: safetensors bytes + metadata (never a pickle)."""
    module = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = ClassifierMeta(
        architecture=cfg.model.architecture,
        num_classes=num_classes,
        input_size=cfg.data.image_size,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
    )
    return st_save(state), meta


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: torch.device, amp: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities N x C, targets N) over a loader, in order."""
    model.eval()
    probs, targets = [], []
    for images, labels in loader:
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images.to(device, non_blocking=True))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        targets.append(labels)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()
