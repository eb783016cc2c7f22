"""The sampler's GPU path, run where CI can: reduced precision, loss scaling, gradient checkpointing,
step noise drawn up front, and what a failing or non-finite step leaves behind (docs/architecture.md 5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from actgen_generator import checkpointing, loss_scale
from actgen_generator.guidance import PosteriorStep, normalized_update
from actgen_generator.loss_scale import LossScale, gradient_health, scaled_gradients
from actgen_generator.sampler import Classifier, GuidedSampler, SampleItem, with_banks
from actgen_shared.architectures import build_classifier
from actgen_shared.schemas import GenerationOptions, Mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (4, 16, 16)  # the tiny model's latent at its native 32 px


def _items(names: list[str], seed0: int = 10, group: str | None = None) -> list[SampleItem]:
    rng = np.random.default_rng(seed0)
    return [
        SampleItem(
            guide=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            class_id=k,
            class_name=name,
            seed=seed0 + k,
            bank_group=group,
        )
        for k, name in enumerate(names)
    ]


def _near_banks(n: int) -> dict[int, torch.Tensor]:
    """Banks within the margin: every contrastive item has a gradient."""
    g = torch.Generator().manual_seed(3)
    return {c: torch.randn(3, *SHAPE, generator=g) * 0.5 for c in range(n)}


# ---------------------------------------------------------------- step noise, recorder
def test_step_noise_is_each_items_generator_read_in_step_order(
    sampler: GuidedSampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawn up front into one tensor, z is what one draw per step gave: after x_T, x^g_T and the
    guide's posterior noise, item i's generator read once per step, so seeds keep their images."""
    seen: list[torch.Tensor] = []
    real_step = PosteriorStep.step

    def spy(self: PosteriorStep, x0: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        seen.append(z.clone())
        return real_step(self, x0, x_t, z)

    monkeypatch.setattr(PosteriorStep, "step", spy)
    items = _items(["cat", "dog"])
    steps = 3
    sampler(items, GenerationOptions(mode=Mode.random, num_inference_steps=steps, grad_steps=0))
    assert len(seen) == steps  # random mode: one posterior step per denoising step
    for item_index, item in enumerate(items):
        g = torch.Generator().manual_seed(item.seed)
        for _ in range(3):  # x_T, x^g_T, the guide's posterior noise
            torch.randn(SHAPE, generator=g)
        for k in range(steps):
            assert torch.equal(seen[k][item_index], torch.randn(SHAPE, generator=g)), (item_index, k)


def test_a_step_that_raises_leaves_the_attention_recorder_off(sampler: GuidedSampler) -> None:
    """An exception mid-step (a CUDA error, say) must not leave the recorder recording: the next
    batch would take the explicit attention path in every call."""
    real_forward = sampler.unet.forward

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected: the UNet failed mid-step")

    sampler.unet.forward = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="injected"):
            sampler(_items(["cat"]), GenerationOptions(mode=Mode.aig, num_inference_steps=2, grad_steps=0))
    finally:
        del sampler.unet.forward
    assert sampler.unet.forward == real_forward
    assert sampler.recorder.recording is False


# ---------------------------------------------------------------- gradient checkpointing
def test_checkpointing_on_reruns_the_guided_forward_and_changes_nothing(sampler: GuidedSampler) -> None:
    """``on`` reaches the UNet (diffusers re-runs a checkpointed block's forward in the backward),
    ``off`` and ``auto`` on the CPU do not, and all give the same latents."""
    block = sampler.unet.up_blocks[0].resnets[0]  # downstream of cross-attention: in the backward
    calls: list[tuple[bool, bool]] = []  # (grad enabled, the UNet's checkpointing flag) per forward
    real_forward = block.forward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]  # (a recompute skips module hooks)
        calls.append((torch.is_grad_enabled(), sampler.unet.is_gradient_checkpointing))
        return real_forward(*args, **kwargs)

    block.forward = counting  # type: ignore[method-assign]
    opts = GenerationOptions(
        mode=Mode.actgen, num_inference_steps=2, grad_steps=1, contrastive_margin=400.0, bank_sample=8
    )
    runs: dict[str, tuple[list[torch.Tensor], list[tuple[bool, bool]]]] = {}
    try:
        for policy in ("on", "off", "auto"):
            sampler.grad_checkpointing = policy  # type: ignore[assignment]
            calls.clear()
            outs = sampler(with_banks(_items(["cat", "dog"]), _near_banks(2)), opts)
            runs[policy] = ([o.latent for o in outs], list(calls))
    finally:
        del block.forward
        sampler.grad_checkpointing = "auto"
    on_calls, off_calls = runs["on"][1], runs["off"][1]
    assert len(on_calls) == len(off_calls) + 1  # the guided call's forward, once more in backward
    assert all(flag for grad, flag in on_calls if grad)
    assert runs["auto"][1] == off_calls and not any(flag for _, flag in off_calls)
    for latent_on, latent_off in zip(runs["on"][0], runs["off"][0], strict=True):
        torch.testing.assert_close(latent_on, latent_off, atol=1e-5, rtol=1e-5)


def _saved_elements(model: torch.nn.Module, run) -> int:  # type: ignore[no-untyped-def]
    """Elements autograd keeps for the backward of ``run()`` (the model's weights not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            sizes[key] = max(sizes.get(key, 0), t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(sizes.values())


def test_the_graph_estimate_that_auto_decides_by_matches_diffusers_blocks(
    sampler: GuidedSampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` weighs the guided graph against the free memory: its estimate is within a quarter
    of what autograd really keeps for the tiny UNet and VAE, and the decision follows the margin."""
    unet, vae = sampler.unet, sampler.vae
    x, c = torch.randn(1, *SHAPE), torch.randn(1, 77, unet.config.cross_attention_dim, requires_grad=True)
    kept = _saved_elements(unet, lambda: unet(x, 500, encoder_hidden_states=c).sample)
    assert 0.75 < kept / checkpointing.unet_graph_elements(unet.config, SHAPE[1:]) < 1.25
    z = torch.randn(1, *SHAPE, requires_grad=True)
    kept = _saved_elements(vae, lambda: vae.decode(z).sample)
    assert 0.75 < kept / checkpointing.vae_decode_graph_elements(vae.config, SHAPE[1:]) < 1.25

    gpu, free = torch.device("cuda", 0), 10 * 2**30
    monkeypatch.setattr(checkpointing, "free_bytes", lambda device: free)
    fits = int(free * checkpointing.FREE_SHARE / checkpointing.GRAPH_MARGIN)
    assert not checkpointing.wants_checkpointing("auto", gpu, fits - 2**20)
    assert checkpointing.wants_checkpointing("auto", gpu, fits + 2**20)
    assert not checkpointing.wants_checkpointing("auto", torch.device("cpu"), 10 * free)
    assert checkpointing.wants_checkpointing("on", torch.device("cpu"), 0)
    assert not checkpointing.wants_checkpointing("off", gpu, 10 * free)


# ---------------------------------------------------------------- loss scaling, non-finite gradients
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_gradient_that_underflows_in_float16_moves_with_the_loss_scale(dtype: torch.dtype) -> None:
    """A float32 leaf (the embedding), a float16 stretch of graph that shrinks the gradient (the
    UNet), a float32 loss: unscaled, the gradient flushes to zero inside the float16 backward;
    scaled, it survives and eq. 11 moves the embedding. bfloat16 keeps float32's range: no scale needed."""
    leaf = torch.ones(1, 3, 4, requires_grad=True)

    def loss() -> torch.Tensor:
        hidden = leaf.to(dtype) * 1e-4  # d hidden / d leaf = 1e-4, in the low-precision dtype
        return (hidden.float() * 1e-5).sum()  # d loss / d hidden = 1e-5: 1e-9 at the leaf

    (plain,) = scaled_gradients(loss(), [leaf], 1.0)
    (scaled,) = scaled_gradients(loss(), [leaf], LossScale(torch.float16, torch.device("cpu")).value)
    finite, zero = gradient_health([scaled])
    assert bool(finite.all()) and not bool(zero.any())
    torch.testing.assert_close(scaled, torch.full_like(scaled, 1e-9), rtol=0.05, atol=0.0)
    moved = normalized_update(leaf.detach(), scaled, lr=0.1, norm="global")
    assert float((moved - leaf.detach()).norm()) == pytest.approx(0.1, rel=1e-4)
    if dtype == torch.float16:  # the scale is what saved it
        assert bool(gradient_health([plain])[1].all())
        assert float(LossScale(dtype, torch.device("cpu")).value) == loss_scale.INIT_SCALE
    else:
        torch.testing.assert_close(plain, scaled, rtol=0.05, atol=0.0)
        assert not LossScale(dtype, torch.device("cpu")).enabled


def test_the_loss_scale_halves_at_a_nonfinite_gradient_and_grows_after_a_finite_run() -> None:
    scale = LossScale(torch.float16, torch.device("cpu"))
    scale.begin_batch()
    for _ in range(3):  # a batch whose gradient stays NaN halves it once, not once a step
        scale.update(torch.tensor([True, False]))
    assert float(scale.value) == loss_scale.INIT_SCALE / 2
    scale.begin_batch()
    scale.update(torch.tensor([False]))
    assert float(scale.value) == loss_scale.INIT_SCALE / 4
    scale.begin_batch()
    for _ in range(2 * loss_scale.GROWTH_INTERVAL):
        scale.update(torch.tensor([True, True]))
    assert float(scale.value) == loss_scale.INIT_SCALE
    fixed = LossScale(torch.float32, torch.device("cpu"))
    fixed.update(torch.tensor([False]))
    assert float(fixed.value) == 1.0


def test_a_nonfinite_gradient_is_counted_and_that_move_skipped(sampler: GuidedSampler) -> None:
    """Item 0's loss is poisoned (its gradient is NaN), item 1 is a normal contrastive item, item
    2's bank lies beyond the margin (its gradient is zero). No NaN reaches an embedding; item 0
    stays where aig would put it; the counts say which steps were which."""
    items = _items(["cat", "dog", "ship"])
    banks = _near_banks(3)
    banks[2] = banks[2] + 1e4  # far beyond the margin: L_contra = 0, a zero gradient
    opts = GenerationOptions(
        mode=Mode.actgen,
        num_inference_steps=3,
        grad_steps=2,
        lr=0.5,
        guidance_scale=5.0,
        contrastive_margin=200.0,
        bank_sample=8,
    )
    real_loss, real_unet = sampler.guidance_loss, sampler._unet
    embeds_seen: list[torch.Tensor] = []

    def poisoned(x0, targets):  # type: ignore[no-untyped-def]
        loss = real_loss(x0, targets)
        poison = torch.tensor([float("nan"), 0.0, 0.0]) * x0.flatten(1).sum(1)
        return dataclasses.replace(loss, total=loss.total + poison)

    def spy(sample, t, embeds, *rest):  # type: ignore[no-untyped-def]
        embeds_seen.append(embeds.detach().clone())
        return real_unet(sample, t, embeds, *rest)

    sampler.guidance_loss, sampler._unet = poisoned, spy  # type: ignore[method-assign]
    try:
        outs = sampler(with_banks(items, banks), opts)
    finally:
        del sampler.guidance_loss, sampler._unet
    counts = [(o.record.zero_grad_steps, o.record.nonfinite_grad_steps) for o in outs]
    assert counts == [(0, 2), (0, 0), (2, 0)]
    assert all(bool(torch.isfinite(e).all()) for e in embeds_seen)
    assert all(bool(torch.isfinite(o.latent).all()) for o in outs)
    assert [len(o.record.grad_records) for o in outs] == [2, 2, 2]
    unguided = sampler(items, opts.model_copy(update={"mode": Mode.aig, "grad_steps": 0}))
    torch.testing.assert_close(outs[0].latent, unguided[0].latent, atol=1e-4, rtol=1e-4)  # never moved
    torch.testing.assert_close(outs[2].latent, unguided[2].latent, atol=1e-4, rtol=1e-4)
    assert float((outs[1].latent - unguided[1].latent).abs().max()) > 1e-3  # moved away from its bank


# ---------------------------------------------------------------- reduced precision, every mode
@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def low_precision(request: pytest.FixtureRequest) -> Iterator[GuidedSampler]:
    """The tiny model loaded in a GPU's dtype, on the CPU (its own load: the weights are cast)."""
    from actgen_generator.pipeline import load_pipeline

    dtype = str(request.param).removeprefix("torch.")
    yield GuidedSampler(load_pipeline(None, device="cpu", dtype=dtype))


@pytest.mark.parametrize("mode", [Mode.random, Mode.ig, Mode.aig, Mode.actgen])
def test_every_mode_is_finite_in_reduced_precision(low_precision: GuidedSampler, mode: Mode) -> None:
    """The dtype path a GPU takes: images and latents finite, and in actgen every guided step's
    gradient (contrastive from the bank and the batch's peer, adversarial through the decode and
    the classifier) non-zero and finite, so eq. 11 moved each item at each step."""
    sampler = low_precision
    torch.manual_seed(0)
    classifier = Classifier(build_classifier("simple_cnn", 10).eval(), 32, (0.5,) * 3, (0.5,) * 3)
    items = _items(["cat", "cat", "dog"], group="job")
    for k, item in enumerate(items):
        item.class_id = [0, 0, 1][k]
    opts = GenerationOptions(
        mode=mode,
        num_inference_steps=3,
        grad_steps=2 if mode is Mode.actgen else 0,
        adv_prob=1.0 if mode is Mode.actgen else 0.0,
        contrastive_margin=400.0,
        bank_sample=8,
    )
    outs = sampler(with_banks(items, _near_banks(2)), opts, classifier=classifier if opts.adv_prob else None)
    for out in outs:
        assert bool(torch.isfinite(out.latent).all())
        assert out.image.dtype == np.uint8 and out.image.std() > 1.0  # not a flat or saturated image
        record = out.record
        assert (record.zero_grad_steps, record.nonfinite_grad_steps) == (0, 0)
        if mode is Mode.actgen:
            assert record.adversarial and len(record.grad_records) == 2
            assert all(
                r.l_contra > 0 and r.l_adv is not None and np.isfinite(r.l_adv) for r in record.grad_records
            )


# ---------------------------------------------------------------- on a GPU (the lead's device check)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run on the device machine")
def test_on_a_gpu_the_step_loop_never_waits_for_the_device() -> None:
    """float16 on CUDA, actgen with a bank larger than N (redrawn each step), a peer and the
    classifier: after the first step, nothing in the loop synchronises with the device (torch's
    sync debug mode would warn), and everything comes out finite with every gradient usable."""
    import warnings

    from actgen_generator.pipeline import load_pipeline

    loaded = load_pipeline(None, device="cuda", dtype="float16")
    assert loaded.device == torch.device("cuda", torch.cuda.current_device())
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    sampler = GuidedSampler(loaded)
    assert sampler.loss_scale.enabled
    torch.manual_seed(0)
    classifier = Classifier(build_classifier("simple_cnn", 10).eval(), 32, (0.5,) * 3, (0.5,) * 3)
    items = _items(["cat", "cat", "dog"], group="job")
    for k, item in enumerate(items):
        item.class_id = [0, 0, 1][k]
    opts = GenerationOptions(
        mode=Mode.actgen,
        num_inference_steps=5,
        grad_steps=3,
        adv_prob=1.0,
        contrastive_margin=400.0,
        bank_sample=2,
    )

    def strict_after_the_first_step(step: int, total: int) -> bool:
        torch.cuda.set_sync_debug_mode("warn" if step < total else "default")
        return True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outs = sampler(with_banks(items, _near_banks(2)), opts, classifier, strict_after_the_first_step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], syncs
    for out in outs:
        assert bool(torch.isfinite(out.latent).all())
        assert (out.record.zero_grad_steps, out.record.nonfinite_grad_steps) == (0, 0)
        assert len(out.record.grad_records) == 3
