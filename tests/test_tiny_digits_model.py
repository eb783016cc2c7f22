"""The shipped tiny digits model: loaded like SD 2.1, it draws the guide's digit on the CPU.

The model folder is loaded by ``load_pipeline`` (``StableDiffusionPipeline.from_pretrained``, as for
SD 2.1) and sampled by the service's ``GuidedSampler``; a reference classifier trained on real
digits (the one ``eval-model`` uses) says which digit each image shows. Seeds are fixed, so the
figures are the same on every run of the same platform; the thresholds leave a margin below
what the shipped model scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from actgen_generator.pipeline import load_pipeline
from actgen_generator.sampler import GuidedSampler, SampleItem
from actgen_lab.model_eval import mean_pairwise_distance
from actgen_lab.tiny_recipe import load_digits_split
from actgen_shared.digits import ReferenceClassifier, grey_features
from actgen_shared.labels import DIGITS
from actgen_shared.schemas import GenerationOptions, Mode

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-digits"
STEPS = 20


@pytest.fixture(scope="module")
def model():
    return load_pipeline(model=str(MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.fixture(scope="module")
def reference(split):
    return ReferenceClassifier(split)


def _one_guide_per_digit(split) -> tuple[np.ndarray, np.ndarray]:
    index = np.array([np.flatnonzero(split.test_labels == c)[0] for c in range(len(DIGITS))])
    return split.test_images[index], split.test_labels[index]


def test_shipped_folder_is_an_sd21_style_diffusers_pipeline(model):
    files = {p.name for p in MODEL_DIR.rglob("*") if p.is_file()}
    assert "model_index.json" in files
    assert not any(
        name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for name in files
    )  # safetensors only
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert 0 < size < 20 * 2**20, f"{size} bytes of weights"
    pipe = model.pipe
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert model.native_size == 32
    # whole words: BOS + 5 words + EOS
    assert len(pipe.tokenizer("a photo of the digit seven").input_ids) == 8
    assert len(pipe.tokenizer("seven", add_special_tokens=False).input_ids) == 1


def test_reference_classifier_reads_real_digits(split, reference):
    accuracy = np.mean(reference.predict(split.test_images) == split.test_labels)
    assert accuracy > 0.95
    assert grey_features(split.test_images[:3]).shape == (3, 64)


def test_aig_mode_draws_the_guides_digit(model, split, reference):
    guides, labels = _one_guide_per_digit(split)
    items = [
        SampleItem(guide=g, class_id=int(c), class_name=DIGITS[c], seed=100 + i)
        for i, (g, c) in enumerate(zip(guides, labels, strict=True))
    ]
    out = GuidedSampler(model)(
        items, GenerationOptions(mode=Mode.aig, num_inference_steps=STEPS, grad_steps=0)
    )
    images = np.stack([o.image for o in out])
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert out[0].latent.shape == (4, 8, 8)
    predicted = reference.predict(images)
    assert np.sum(predicted == labels) >= 8, f"guides {labels.tolist()} -> {predicted.tolist()}"
    # Not a copy of the guide, and not a blank: strokes on a dark ground, as the real digits.
    assert np.abs(images.astype(float) - guides.astype(float)).mean() > 1.0
    assert 20 < images.mean() < 160


def test_aig_mode_varies_with_the_seed(model, split):
    guides, labels = _one_guide_per_digit(split)
    items = [SampleItem(guide=guides[3], class_id=3, class_name=DIGITS[3], seed=s) for s in range(3)]
    out = GuidedSampler(model)(
        items, GenerationOptions(mode=Mode.aig, num_inference_steps=STEPS, grad_steps=0)
    )
    assert mean_pairwise_distance([np.stack([o.image for o in out])]) > 0.01


def test_random_mode_follows_the_prompt(model, reference):
    labels = np.repeat(np.arange(len(DIGITS)), 2)
    blank = np.zeros((32, 32, 3), np.uint8)
    items = [
        SampleItem(guide=blank, class_id=int(c), class_name=DIGITS[c], seed=200 + i)
        for i, c in enumerate(labels)
    ]
    out = GuidedSampler(model)(
        items, GenerationOptions(mode=Mode.random, num_inference_steps=STEPS, grad_steps=0)
    )
    predicted = reference.predict(np.stack([o.image for o in out]))
    assert np.sum(predicted == labels) >= 10, f"prompts {labels.tolist()} -> {predicted.tolist()}"


def test_actgen_pushes_away_from_a_filled_bank_farther_than_aig(model, split, reference):
    """With a bank of earlier images of the same guides, actgen's gradient guidance (defaults but
    the steps) lands farther from the bank than aig with the same seeds, and the images differ."""
    sampler = GuidedSampler(model)
    guides, labels = _one_guide_per_digit(split)

    def items(seed0: int, bank=None) -> list[SampleItem]:
        return [
            SampleItem(
                guide=g,
                class_id=int(c),
                class_name=DIGITS[int(c)],
                seed=seed0 + i,
                bank=None if bank is None else bank[int(c)],
            )
            for i, (g, c) in enumerate(zip(guides, labels, strict=True))
        ]

    aig = GenerationOptions(mode=Mode.aig, num_inference_steps=STEPS, seed=0)
    earlier = [sampler(items(1000 * r), aig) for r in (1, 2, 3)]
    bank = {int(c): torch.stack([run[i].latent for run in earlier]) for i, c in enumerate(labels)}
    plain = sampler(items(0, bank), aig)
    guided = sampler(items(0, bank), aig.model_copy(update={"mode": Mode.actgen}))

    def distance(outs) -> float:
        return float(
            np.mean(
                [(o.latent.flatten() - bank[o.record.class_id].flatten(1)).norm(dim=1).mean() for o in outs]
            )
        )

    assert all(len(o.record.grad_records) > 0 for o in guided)
    assert distance(guided) > 1.08 * distance(plain), (distance(guided), distance(plain))
    diff = np.abs(np.stack([o.image for o in guided]).astype(int) - np.stack([o.image for o in plain]))
    assert diff.max() > 64 and diff.mean() > 2.0  # visibly different, not rounding noise
    faithful = float((reference.predict(np.stack([o.image for o in guided])) == labels).mean())
    assert faithful >= 0.7, faithful
