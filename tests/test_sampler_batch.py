"""Sampler determinism, batch independence, cancellation, provenance and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actgen_generator.sampler import Cancelled, Classifier, SampleItem, fewshot_strength, with_banks
from actgen_shared.architectures import build_classifier
from actgen_shared.labels import CIFAR10
from actgen_shared.schemas import GenerationOptions, Mode

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(build_classifier("simple_cnn", 10).eval(), 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


@pytest.fixture(scope="module")
def banks() -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {c: torch.randn(5, 4, 16, 16, generator=g) * 3 for c in range(10)}


def _items(n: int, seed0: int = 100) -> list[SampleItem]:
    rng = np.random.default_rng(0)
    return [
        SampleItem(
            guide=rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8),
            class_id=i % 10,
            class_name=CIFAR10[i % 10],
            seed=seed0 + i,
            guide_id=f"g{i}",
        )
        for i in range(n)
    ]


ACTGEN = GenerationOptions(
    mode=Mode.actgen, num_inference_steps=STEPS, grad_steps=2, adv_prob=0.5, contrastive_margin=400.0
)


def test_same_seed_same_output_different_seed_different(sampler, banks, classifier) -> None:
    items = _items(2)
    a = sampler(with_banks(items, banks), ACTGEN, classifier=classifier)
    b = sampler(with_banks(items, banks), ACTGEN, classifier=classifier)
    c = sampler(with_banks(_items(2, seed0=200), banks), ACTGEN, classifier=classifier)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x.latent, y.latent) and np.array_equal(x.image, y.image)
        assert x.record == y.record
        assert not torch.allclose(x.latent, z.latent)


def test_batch_of_8_equals_8_batches_of_1(sampler, banks, classifier) -> None:
    items = _items(8)
    batched = sampler(with_banks(items, banks), ACTGEN, classifier=classifier)
    assert {o.record.adversarial for o in batched} == {True, False}  # both kinds are in the batch
    assert any(r.l_contra > 0 for o in batched for r in o.record.grad_records)
    for k, item in enumerate(items):
        (single,) = sampler(with_banks([item], banks), ACTGEN, classifier=classifier)
        torch.testing.assert_close(batched[k].latent, single.latent, atol=1e-3, rtol=1e-3)
        assert np.abs(batched[k].image.astype(int) - single.image.astype(int)).max() <= 2
        assert batched[k].record.adversarial == single.record.adversarial
        assert len(batched[k].record.grad_records) == len(single.record.grad_records) == 2
        for rb, rs in zip(batched[k].record.grad_records, single.record.grad_records, strict=True):
            assert rb.l_contra == pytest.approx(rs.l_contra, rel=1e-3, abs=1e-3)
            assert rb.prediction == rs.prediction


def test_provenance_and_output_size(sampler, banks, classifier) -> None:
    items = _items(3)
    opts = ACTGEN.model_copy(update={"output_size": 16, "adv_prob": 1.0})
    outs = sampler(with_banks(items, banks), opts, classifier=classifier)
    for k, (item, out) in enumerate(zip(items, outs, strict=True)):
        rec = out.record
        assert out.image.shape == (16, 16, 3) and out.image.dtype == np.uint8
        assert out.latent.shape == (4, 16, 16) and out.latent.dtype == torch.float32
        assert (rec.index, rec.class_id, rec.class_name, rec.guide_id, rec.seed) == (
            k,
            item.class_id,
            item.class_name,
            item.guide_id,
            item.seed,
        )
        assert rec.mode is Mode.actgen and rec.adversarial and (rec.width, rec.height) == (32, 32)
        assert [r.step for r in rec.grad_records] == [0, 1]
        assert all(r.l_adv is not None and r.l_adv <= 0 and 0 <= r.prediction < 10 for r in rec.grad_records)


def test_plain_draw_is_plain_sd_with_the_same_noise(sampler) -> None:
    items = _items(2)
    plain = sampler(
        items, GenerationOptions(mode=Mode.aig, num_inference_steps=STEPS, grad_steps=0, plain_prob=1.0)
    )
    random = sampler(items, GenerationOptions(mode=Mode.random, num_inference_steps=STEPS, grad_steps=0))
    for p, r in zip(plain, random, strict=True):
        assert p.record.mode is Mode.random
        # aig records attention on the explicit path, random uses SDPA: equal up to float error
        torch.testing.assert_close(p.latent, r.latent, atol=1e-3, rtol=1e-3)


def test_fewshot_strength_comes_from_confidence(sampler) -> None:
    items = _items(2)
    items[0].confidence, items[1].confidence = 0.05, 0.95
    opts = GenerationOptions(mode=Mode.ig, num_inference_steps=STEPS, grad_steps=0, fewshot_u=0.5)
    outs = sampler(items, opts)
    # eta_f is stated for A.3's 40 steps: it scales to the steps as i does
    assert [o.record.image_guidance_strength for o in outs] == [
        pytest.approx(fewshot_strength(0.05, 0.5) * STEPS / 40),
        pytest.approx(fewshot_strength(0.95, 0.5) * STEPS / 40),
    ]


def test_on_step_reports_progress_and_cancels(sampler) -> None:
    seen: list[tuple[int, int]] = []
    opts = GenerationOptions(mode=Mode.aig, num_inference_steps=STEPS, grad_steps=0)
    sampler(_items(1), opts, on_step=lambda s, n: seen.append((s, n)) or True)
    assert seen == [(k, STEPS) for k in range(1, STEPS + 1)]
    calls: list[int] = []
    with pytest.raises(Cancelled):
        sampler(_items(1), opts, on_step=lambda s, n: calls.append(s) or s < 2)
    assert calls == [1, 2]


def test_bad_inputs_are_named(sampler, banks) -> None:
    with pytest.raises(ValueError, match="classifier"):
        sampler(with_banks(_items(1), banks), ACTGEN, classifier=None)
    bad = _items(1)
    bad[0].guide = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"items\[0\].guide"):
        sampler(bad, GenerationOptions(mode=Mode.ig, num_inference_steps=2, grad_steps=0))
    wrong = {0: torch.zeros(2, 4, 8, 8)}
    with pytest.raises(ValueError, match="memory bank of class 0"):
        sampler(with_banks(_items(1), wrong), ACTGEN.model_copy(update={"adv_prob": 0.0}))
