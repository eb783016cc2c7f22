"""The paper's recipes as configs: every shipped config validates and trains one tiny step.

Also the arithmetic the recipes rest on: the linear lr scaling rule, the budget spread over
generation epochs and ranks, and the authors' VGG-16 head (which the generator rebuilds too).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from actgen_shared.architectures import build_classifier, load_classifier
from actgen_trainer.config import ConfigError, load_config
from actgen_trainer.loop import images_per_rank_epoch
from actgen_trainer.mixing import build_mixing
from actgen_trainer.models import (
    build_model,
    build_optimizer,
    build_scheduler,
    classifier_payload,
    scaled_lr,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
IMAGENET_TRAIN = 1_281_167


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_and_trains_one_step_on_fake_data(path: Path, one_torch_thread: None) -> None:
    cfg = load_config(path)
    num_classes = {
        "digits": 10,
        "backgrounds": 10,
        "cifar10": 10,
        "cifar100": 100,
        "imagenet": 1000,
        "imagefolder": 10,
    }[cfg.data.dataset]
    torch.manual_seed(0)
    model = build_model(cfg, num_classes)
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim, cfg.train.batch_size))
    schedule = build_scheduler(optimizer, cfg.optim, cfg.train.epochs, cfg.train.batch_size)
    schedule.set(0.5)
    size = cfg.data.image_size
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    mixer, loss_fn = build_mixing(cfg, num_classes)  # Mixup / CutMix where the recipe has them
    targets = labels
    if mixer is not None:
        images, targets = mixer(images, labels)
    model.train()
    loss = loss_fn(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert math.isfinite(float(loss.detach()))


def test_imagenet_recipe_scales_lr_and_spreads_a_ten_percent_budget() -> None:
    cfg = load_config(REPO / "configs" / "imagenet_resnet50.yaml")
    assert (cfg.optim.lr, cfg.optim.lr_batch, cfg.optim.warmup_epochs) == (1.6, 4096, 5)
    assert scaled_lr(cfg.optim, 8 * cfg.train.batch_size) == pytest.approx(0.4)  # 8 GPUs
    assert scaled_lr(cfg.optim, 32 * cfg.train.batch_size) == pytest.approx(1.6)  # Table 5
    assert cfg.generation.budget == 0.10 and cfg.generation_epochs == 45
    budget = round(0.10 * IMAGENET_TRAIN)
    # the budget is the whole run's, exactly, however many ranks share it (not 1.8 %, nor x 8)
    for world in (1, 3, 8):
        shares = [
            [images_per_rank_epoch(cfg, IMAGENET_TRAIN, world, rank, e) for rank in range(world)]
            for e in range(45)
        ]
        assert sum(map(sum, shares)) == budget
        assert all(max(epoch) - min(epoch) <= 1 for epoch in shares)  # near-equal, low ranks first
        assert all(epoch == sorted(epoch, reverse=True) for epoch in shares)
    assert images_per_rank_epoch(cfg, IMAGENET_TRAIN, 8, 0, 0) == 356  # 2,848 over 8 GPUs
    # without a budget, images_per_epoch is the run's per epoch: 64 x 150 = 9.6K on 1 GPU or 4
    plain = load_config(REPO / "configs" / "cifar10_resnet50.yaml")
    for world in (1, 4):
        per_run = sum(
            images_per_rank_epoch(plain, 50_000, world, r, e) for r in range(world) for e in range(150)
        )
        assert per_run == 9_600
    assert [images_per_rank_epoch(plain, 50_000, 3, r, 0) for r in range(3)] == [22, 21, 21]
    assert images_per_rank_epoch(plain, 50_000, 128, 64, 0) == 0  # a rank whose share is 0 posts nothing


def test_warmup_is_per_iteration() -> None:
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["optim.warmup_epochs=2", "optim.lr=0.1", "optim.lr_batch=100", "train.epochs=10"],
    )
    model = torch.nn.Linear(2, 2)
    schedule = build_scheduler(build_optimizer(model, cfg.optim), cfg.optim, 10, global_batch=200)
    assert schedule.base_lr == pytest.approx(0.2)
    lrs = [schedule.set(k / 4) for k in range(9)]  # 4 iterations per epoch, 2 epochs
    assert lrs == pytest.approx([0.2 * k / 8 for k in range(8)] + [0.2])
    assert schedule.set(6.0) == pytest.approx(0.1)  # half-way through the cosine


def test_budget_and_lr_batch_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match="generation.budget"):
        load_config(None, ["generation.budget=0"])
    with pytest.raises(ConfigError, match="optim.lr_batch"):
        load_config(None, ["optim.lr_batch=0"])


def test_vgg16_has_the_authors_head_and_the_generator_rebuilds_it() -> None:
    model = build_classifier("cifar_vgg16", 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 10)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = load_classifier("cifar_vgg16", 10, state)  # what the generator does with an upload
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt(x), model(x))


@pytest.mark.parametrize("architecture", ["vit_small_patch16_224", "resnet152"])
def test_table5_classifiers_are_allow_listed_and_the_generator_rebuilds_them(
    architecture: str, one_torch_thread: None
) -> None:
    """Trainer and generator read the same allow-list; an upload rebuilds from safetensors only."""
    from actgen_generator.classifiers import build_checked

    cfg = load_config(
        REPO / "configs" / "imagenet_vit_s16.yaml",
        [f"model.architecture={architecture}", "data.image_size=224"],
    )
    model = build_model(cfg, 5)
    weights, meta = classifier_payload(model, cfg, 5)
    rebuilt = build_checked(weights, meta)
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-5)


def test_a_timm_name_outside_the_allow_list_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="model.architecture"):
        load_config(None, ["model.architecture=vit_huge_patch14_224"])


def test_vit_recipe_trains_on_randaugment_and_random_erasing() -> None:
    import numpy as np
    from PIL import Image

    from actgen_trainer.data import transforms_for

    cfg = load_config(REPO / "configs" / "imagenet_vit_s16.yaml", ["data.image_size=64"])
    train = transforms_for(cfg.data, train=True)
    names = repr(train)
    assert "RandAugment" in names and "RandomErasing(p=0.25" in names
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8))
    assert tuple(train(image).shape) == (3, 64, 64)
    assert tuple(transforms_for(cfg.data, train=False)(image).shape) == (3, 64, 64)
    with pytest.raises(ConfigError, match="data.randaugment"):
        load_config(None, ["data.randaugment=rand-m9"])  # digits: augment is not imagenet
    with pytest.raises(ConfigError, match="data.randaugment"):
        load_config(None, ["data.augment=imagenet", "data.randaugment=autoaug"])
