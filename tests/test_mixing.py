"""Mixup / CutMix (Table 5's ViT-S/16 recipe) through timm: soft targets, odd batches, the loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.loss import SoftTargetCrossEntropy
from trainer_helpers import REPO, small_config

from actgen_trainer.config import ConfigError, load_config
from actgen_trainer.loop import Trainer
from actgen_trainer.mixing import BatchMixer, build_mixing
from actgen_trainer.models import Loss

VIT = REPO / "configs" / "imagenet_vit_s16.yaml"


def test_vit_recipe_mixes_and_the_others_do_not() -> None:
    vit = load_config(VIT)
    assert (vit.data.mixup_alpha, vit.data.cutmix_alpha, vit.optim.label_smoothing) == (0.2, 1.0, 0.1)
    mixer, loss = build_mixing(vit, 1000)
    assert isinstance(mixer, BatchMixer) and isinstance(loss, SoftTargetCrossEntropy)
    for name in ("demo.yaml", "imagenet_resnet50.yaml", "cifar10_resnet50.yaml"):
        mixer, loss = build_mixing(load_config(REPO / "configs" / name), 10)
        assert mixer is None and isinstance(loss, Loss)  # off by default: hard labels as before


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixed_targets_are_soft_rows_that_sum_to_one(mode: str) -> None:
    cfg = load_config(VIT, ["data.image_size=32", f"data.mix_mode={mode}"])
    mixer, _ = build_mixing(cfg, 10)
    assert mixer is not None
    np.random.seed(3)  # timm draws lambda and the boxes from NumPy's global RNG
    images = torch.rand(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mixed, targets = mixer(images.clone(), labels)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert targets.shape == (8, 10)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    off = 0.1 / 10  # label smoothing's floor
    own = targets[torch.arange(8), labels]
    partner = targets[torch.arange(8), labels.flip(0)]  # timm pairs image i with image n-1-i
    # all the mass above the floor sits on the image's class and its partner's: lam and 1 - lam
    assert torch.allclose(own + partner, torch.full((8,), 1 - 0.1 + 2 * off))
    mixed_rows = (torch.minimum(own, partner) > off + 0.01).sum().item()
    # not one-hot: one lambda per batch mixes every row; per pair or element, some rows at least
    assert mixed_rows == 8 if mode == "batch" else mixed_rows >= 2


def test_an_odd_batch_mixes_all_but_the_last_image() -> None:
    cfg = load_config(VIT, ["data.image_size=32", "data.cutmix_alpha=0"])  # Mixup alone
    mixer, _ = build_mixing(cfg, 10)
    assert mixer is not None
    np.random.seed(0)
    images = torch.rand(5, 3, 32, 32)
    labels = torch.tensor([1, 2, 3, 4, 5])
    mixed, targets = mixer(images.clone(), labels)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    assert not torch.equal(mixed[:4], images[:4]) and torch.equal(mixed[4], images[4])
    expected_last = torch.full((10,), 0.01)
    expected_last[5] = 0.91
    assert torch.allclose(targets[4], expected_last)  # label-smoothed one-hot, unmixed
    single, single_targets = mixer(images[:1].clone(), labels[:1])
    assert torch.equal(single, images[:1]) and single_targets.argmax().item() == 1


def test_mixing_is_checked_by_name() -> None:
    with pytest.raises(ConfigError, match="optim.loss"):
        load_config(VIT, ["optim.loss=focal"])
    with pytest.raises(ConfigError, match="data.mix_mode"):
        load_config(VIT, ["data.mix_mode=row"])
    with pytest.raises(ConfigError, match="data.mixup_alpha"):
        load_config(None, ["data.mixup_alpha=-1"])
    with pytest.raises(ConfigError, match="data.mix_prob"):
        load_config(None, ["data.mix_prob=2"])


def test_the_loop_trains_on_mixed_batches(tmp_path: Path, one_torch_thread: None) -> None:
    """Batches of 49 out of 150: three odd batches and a remainder of 3 go through the mixer."""
    cfg = small_config(
        tmp_path,
        "generation.mode=real",
        "train.epochs=1",
        "train.batch_size=49",
        "data.mixup_alpha=0.2",
        "data.cutmix_alpha=1.0",
        "optim.label_smoothing=0.1",
    )
    trainer = Trainer(cfg, client=None, progress=False)
    assert isinstance(trainer.loss_fn, SoftTargetCrossEntropy) and trainer.mixer is not None
    summary = trainer.run()
    row = trainer.state.metrics[0]
    assert math.isfinite(row["train_loss"]) and row["train_size"] == 150
    assert 0.0 <= summary.test_acc <= 1.0
