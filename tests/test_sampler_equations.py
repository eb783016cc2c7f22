"""Each equation of the sampler against a reference computed here, on the tiny model (eq. 4-11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from actgen_generator.attention import RECORD_KWARG, RecordingAttnProcessor, normalize_mask, upsample_mask
from actgen_generator.guidance import (
    PosteriorStep,
    cfg_noise,
    classifier_input,
    contrastive_loss,
    fewshot_strength,
    gamma,
    normalized_update,
)
from actgen_generator.sampler import Classifier, GradientTargets, GuidedSampler, SampleItem, with_banks
from actgen_shared.architectures import build_classifier
from actgen_shared.schemas import GenerationOptions, Mode

SEED = 7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _guide(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _embeds(sampler: GuidedSampler, names: list[str]):
    items = [SampleItem(guide=_guide(), class_id=0, class_name=n, seed=0) for n in names]
    return sampler._encode_prompts(items)


def _unet(sampler: GuidedSampler, x, t, c) -> torch.Tensor:
    with torch.no_grad():
        return sampler.unet(x, t, encoder_hidden_states=c).sample


# ---------------------------------------------------------------- eq. 4
def test_cfg_combination_matches_separate_unet_calls(sampler: GuidedSampler) -> None:
    uncond, cond, weights = _embeds(sampler, ["cat", "dog", "ship"])
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    pred = sampler.predict_noise(x, t, uncond, cond, weights)
    ref_u = _unet(sampler, x, t, uncond)
    ref_c = _unet(sampler, x, t, cond)
    s = 15.0
    torch.testing.assert_close(
        cfg_noise(pred.uncond, pred.cond, s), ref_u + s * (ref_c - ref_u), atol=1e-4, rtol=1e-4
    )
    assert pred.leaves == ()
    # the graph-keeping split of a gradient step gives the same noise, with or without uncond moving
    for update_uncond, n_leaves in ((False, 1), (True, 2)):
        split = sampler.predict_noise(x, t, uncond, cond, weights, torch.tensor([1]), update_uncond)
        torch.testing.assert_close(split.uncond, ref_u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(split.cond, ref_c, atol=1e-5, rtol=1e-5)
        assert len(split.leaves) == n_leaves
        assert all(v.requires_grad and v.shape == (1, *cond.shape[1:]) for v in split.leaves)
        (grad,) = torch.autograd.grad(split.cond[1].sum() + split.uncond[1].sum(), split.leaves[-1])
        assert float(grad.abs().sum()) > 0  # the graph reaches the leaf it names


def test_the_lab_probe_sees_every_row_with_its_graph_and_the_maps_the_record_holds(
    sampler: GuidedSampler,
) -> None:
    """The tiny models' training probe (lab: set as the recording layers' ``recorder``) still gets
    every row's probabilities with their graph, and its class-token maps of the conditional rows are
    the ones a :class:`ClassTokenRecord` receives."""
    from actgen_lab.tiny_unet_training import AttentionProbe

    uncond, cond, weights = _embeds(sampler, ["cat", "aquarium fish"])
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t, embeds = torch.tensor(301), torch.cat([uncond, cond])
    sampler.recorder.begin_step(2, (16, 16), torch.device("cpu"))
    record = sampler.recorder.record(weights)
    sampler.recorder.reset()
    assert record is not None
    with torch.no_grad():
        sampler.unet(x, t, encoder_hidden_states=embeds, cross_attention_kwargs={RECORD_KWARG: record})
    layers = [p for p in sampler.unet.attn_processors.values() if isinstance(p, RecordingAttnProcessor)]
    probe = AttentionProbe(sampler.recorder.factor)
    probe.recording, probe.weights = True, torch.cat([torch.zeros_like(weights), weights])
    leaf = embeds.clone().requires_grad_(True)
    try:
        for layer in layers:
            layer.recorder = probe
        sampler.unet(x, t, encoder_hidden_states=leaf)
    finally:
        for layer in layers:
            layer.recorder = None
    maps = probe.take()  # (4 rows, queries), averaged over the layers
    assert maps.requires_grad  # the graph the attention loss trains through
    torch.testing.assert_close(maps[2:].detach(), record.maps.mean(0), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- eq. 5-11, the whole loop
class _ClassTokenMaps:
    """Independent mask reference: softmax(q k^T) of the class tokens at the recording layers."""

    def __init__(self, sampler: GuidedSampler, weights: torch.Tensor) -> None:
        self.maps: list[torch.Tensor] = []
        self.on = False
        self.hooks = []
        for module in sampler.unet.modules():
            if isinstance(module, Attention) and isinstance(module.processor, RecordingAttnProcessor):
                self.hooks.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        self.weights = weights

    def _hook(self, mod, args, kwargs) -> None:
        if not self.on:
            return
        with torch.no_grad():
            h, e = args[0], kwargs["encoder_hidden_states"]
            q = mod.to_q(h).unflatten(-1, (mod.heads, -1)).transpose(1, 2)
            k = mod.to_k(e).unflatten(-1, (mod.heads, -1)).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) * mod.scale).softmax(-1).mean(1)  # (B, q, 77)
            self.maps.append(torch.einsum("bqk,bk->bq", probs, self.weights))

    def take(self) -> torch.Tensor:
        """This step's map, averaged over the layers: (1, 8, 8)."""
        out = torch.stack(self.maps).mean(0).view(1, 8, 8)
        self.maps.clear()
        return out

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _reference_run(
    sampler: GuidedSampler,
    mode: Mode,
    steps: int,
    scale: float,
    strength: float,
    bank: torch.Tensor | None = None,
    grad_steps: int = 0,
    lr: float = 0.0,
    norm: str = "token",
    update_uncond: bool = False,
    margin: float = 200.0,
    normalize_mask: bool = True,
    trace: list | None = None,
):
    """The sampler's loop written out: diffusers' DDPMScheduler.step as the DDPM step, the mask from
    hooks on the attention layers, the gradient of eq. 9 by autograd and eq. 11 normalised by hand."""
    g = torch.Generator().manual_seed(SEED)
    shape = (4, 16, 16)
    x = torch.randn(shape, generator=g)[None]
    x_guide = torch.randn(shape, generator=g)[None]
    guide_eps = torch.randn(shape, generator=g)[None]
    pixels = torch.from_numpy(_guide()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        dist = sampler.vae.encode(pixels).latent_dist
    guide = (dist.mean + dist.std * guide_eps) * sampler.vae.config.scaling_factor
    uncond, cond, weights = _embeds(sampler, ["cat"])
    scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    maps = _ClassTokenMaps(sampler, weights)
    attention = torch.zeros(1, 8, 8) if normalize_mask else torch.ones(1, 8, 8)
    try:
        for k, t in enumerate(scheduler.timesteps):
            a = scheduler.alphas_cumprod[t]
            gradient = mode is Mode.actgen and k < grad_steps
            u = uncond.clone().requires_grad_(gradient and update_uncond)
            c = cond.clone().requires_grad_(gradient)
            with torch.set_grad_enabled(gradient):
                eps_u = sampler.unet(x, t, encoder_hidden_states=u).sample
                maps.on = True
                eps_c = sampler.unet(x, t, encoder_hidden_states=c).sample
                maps.on = False
                eps = eps_u + scale * (eps_c - eps_u)
            if trace is not None:
                trace.append((cond.clone(), uncond.clone()))
            if gradient:  # eq. 9 on x0_hat, eq. 11 on c (and uncond)
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                loss = (margin - (x0.flatten(1) - bank.flatten(1)).norm(dim=1)).clamp(min=0).mean()
                leaves = [c, u] if update_uncond else [c]
                grads = torch.autograd.grad(loss, leaves)
                moved = []
                for leaf, grad in zip(leaves, grads, strict=True):
                    if norm == "token":  # each channel over the 77 tokens
                        step = grad / grad.norm(dim=1, keepdim=True)
                    else:
                        step = grad / grad.norm()
                    moved.append(leaf.detach() - lr * step)
                cond = moved[0]
                if update_uncond:
                    uncond = moved[1]
            eps = eps.detach()
            state = g.get_state()
            x_prev = scheduler.step(eps, t, x, generator=g).prev_sample
            if mode is not Mode.random:
                # eq. 6: the same posterior step with x0 := guide, fed as the eps that predicts it
                eps_guide = (x_guide - a.sqrt() * guide) / (1 - a).sqrt()
                g_same = torch.Generator().set_state(state)
                x_guide = scheduler.step(eps_guide, t, x_guide, generator=g_same).prev_sample
                gam = 1 - math.exp(k - strength) / (1 + math.exp(k - strength))
                m = torch.ones(1, 1, 16, 16)  # ig
                if mode in (Mode.aig, Mode.actgen):  # accumulated over steps, min-max, bilinear
                    attention = attention + maps.take()
                    m = attention
                    if normalize_mask:
                        m = (m - m.min()) / (m.max() - m.min())
                    m = torch.nn.functional.interpolate(
                        m[:, None], size=(16, 16), mode="bilinear", align_corners=False
                    )
                x_prev = x_prev + gam * m * (x_guide - x_prev)  # eq. 8
            x = x_prev.detach()
    finally:
        maps.remove()
    return x[0]


@pytest.mark.parametrize("mode", [Mode.ig, Mode.random])
def test_guided_steps_match_ddpm_posterior_plus_image_guidance(sampler: GuidedSampler, mode: Mode) -> None:
    opts = GenerationOptions(
        mode=mode,
        num_inference_steps=3,
        grad_steps=0,
        guidance_scale=5.0,
        image_guidance_strength=1.5,
        image_guidance_reference_steps=None,  # i as given: the reference takes it so
    )
    out = sampler([SampleItem(guide=_guide(), class_id=3, class_name="cat", seed=SEED)], opts)[0]
    ref = _reference_run(sampler, mode, steps=3, scale=5.0, strength=1.5)
    torch.testing.assert_close(out.latent, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("normalize_mask", [True, False])
def test_aig_mask_accumulates_over_steps_as_the_reference(
    sampler: GuidedSampler, normalize_mask: bool
) -> None:
    """eq. 8 with m = the class-token attention summed over the steps so far (normalised, or the
    released code's raw sum from ones), at every step, against the hook-computed reference."""
    opts = GenerationOptions(
        mode=Mode.aig,
        num_inference_steps=4,
        grad_steps=0,
        guidance_scale=5.0,
        image_guidance_strength=2.5,
        image_guidance_reference_steps=None,
        normalize_mask=normalize_mask,
    )
    out = sampler([SampleItem(guide=_guide(), class_id=3, class_name="cat", seed=SEED)], opts)[0]
    ref = _reference_run(sampler, Mode.aig, steps=4, scale=5.0, strength=2.5, normalize_mask=normalize_mask)
    torch.testing.assert_close(out.latent, ref, atol=2e-4, rtol=2e-4)
    # and the mask matters: the ig run (m = 1) lands elsewhere
    ig = _reference_run(sampler, Mode.ig, steps=4, scale=5.0, strength=2.5)
    assert float((ig - ref).abs().max()) > 1e-2


@pytest.mark.parametrize(("norm", "update_uncond"), [("token", True), ("token", False), ("global", False)])
def test_actgen_loop_matches_the_reference_and_carries_c(
    sampler: GuidedSampler, norm: str, update_uncond: bool
) -> None:
    """Eq. 9-11 inside the loop: the moved c (and uncond) is used by every later step."""
    bank = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(11)) * 0.5
    opts = GenerationOptions(
        mode=Mode.actgen,
        num_inference_steps=4,
        grad_steps=2,
        guidance_scale=5.0,
        image_guidance_strength=2.5,
        image_guidance_reference_steps=None,
        normalize_mask=True,  # the reference's mask
        lr=0.5,
        grad_norm=norm,
        update_uncond=update_uncond,
        contrastive_margin=200.0,
    )
    seen: list[torch.Tensor] = []
    real_unet = sampler._unet

    def spy(sample, t, embeds, *rest):
        seen.append(embeds.detach().clone())
        return real_unet(sample, t, embeds, *rest)

    sampler._unet = spy
    try:
        item = SampleItem(guide=_guide(), class_id=3, class_name="cat", seed=SEED, bank=bank)
        out = sampler([item], opts)[0]
    finally:
        del sampler._unet
    trace: list = []
    ref = _reference_run(
        sampler,
        Mode.actgen,
        steps=4,
        scale=5.0,
        strength=2.5,
        bank=bank,
        grad_steps=2,
        lr=0.5,
        norm=norm,
        update_uncond=update_uncond,
        trace=trace,
    )
    torch.testing.assert_close(out.latent, ref, atol=1e-3, rtol=1e-3)
    assert len(out.record.grad_records) == 2 and out.record.grad_records[0].l_contra > 0
    # the embeddings each step used: c moved at steps 0 and 1, then kept (not reset) for steps 2, 3
    c0, u0 = trace[0]
    c2, u2 = trace[2]
    assert torch.equal(trace[2][0], trace[3][0]) and not torch.allclose(c2, c0)
    assert torch.allclose(u2, u0) != update_uncond
    moved = (c2 - c0)[0]
    if norm == "global":  # two steps of size lr each, at most 2 lr apart
        assert float(moved.norm()) <= 2 * 0.5 + 1e-4 and float(moved.norm()) > 0.5
    else:  # each channel moved by at most 2 lr over the tokens, and the whole by about lr sqrt(D)
        per_channel = moved.norm(dim=0)
        assert float(per_channel.max()) <= 2 * 0.5 + 1e-4
        assert float(moved.norm()) > 0.5 * math.sqrt(moved.shape[1])
    # the sampler fed the UNet the same moved embeddings as the reference at the last step
    last_cond = seen[-1][-1]
    torch.testing.assert_close(last_cond, trace[3][0][0], atol=1e-4, rtol=1e-4)


def test_posterior_step_and_x0_match_the_scheduler(sampler: GuidedSampler) -> None:
    scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
    scheduler.set_timesteps(10)
    x, eps = torch.randn(2, 1, 4, 4, 4).unbind(0)
    for t in scheduler.timesteps[[0, 5, 9]]:
        post = PosteriorStep.at(scheduler, t)
        g = torch.Generator().manual_seed(1)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        out = scheduler.step(eps, t, x, generator=g)
        torch.testing.assert_close(post.predict_x0(x, eps), out.pred_original_sample)
        torch.testing.assert_close(
            post.step(post.predict_x0(x, eps), x, z), out.prev_sample, atol=1e-5, rtol=1e-5
        )


def test_gamma_is_one_minus_sigmoid_and_fewshot_strength() -> None:
    for k in range(0, 40, 7):
        want = 1 - math.exp(k - 12.5) / (1 + math.exp(k - 12.5))
        assert gamma(k, 12.5) == pytest.approx(want)
        assert float(gamma(k, torch.tensor([12.5]))[0]) == pytest.approx(want, rel=1e-6)
    assert fewshot_strength(0.1, 0.1) == pytest.approx(30 / 2 + 5)
    assert fewshot_strength(0.9, 0.1) == pytest.approx(30 / (1 + math.exp(8)) + 5)
    assert fewshot_strength(1.0, -10.0) == pytest.approx(5.0)


# ---------------------------------------------------------------- the mask (eq. 8)
def test_mask_recorder_sits_only_on_cross_attention_at_the_mask_resolution(sampler: GuidedSampler) -> None:
    procs = sampler.unet.attn_processors
    recording = {n for n, p in procs.items() if isinstance(p, RecordingAttnProcessor)}
    # the tiny UNet has cross-attention at factors 1 and 2: latent/4 is nearest to factor 2
    assert recording == {
        n for n in procs if "attn2" in n and (n.startswith("down_blocks.1") or n.startswith("up_blocks.0"))
    }
    assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if n not in recording)


def test_mask_follows_recorded_class_token_attention(sampler: GuidedSampler) -> None:
    uncond, cond, weights = _embeds(sampler, ["cat", "aquarium fish"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(401)
    # independent reference: softmax(q k^T) of the class tokens at the recording layers, cond rows only
    maps = []
    hooks = []
    for module in sampler.unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, RecordingAttnProcessor):

            def hook(mod, args, kwargs, store=maps):
                h, e = args[0], kwargs["encoder_hidden_states"]
                q = mod.to_q(h).unflatten(-1, (mod.heads, -1)).transpose(1, 2)
                k = mod.to_k(e).unflatten(-1, (mod.heads, -1)).transpose(1, 2)
                probs = (q @ k.transpose(-1, -2) * mod.scale).softmax(-1)  # (2B, heads, q, 77)
                store.append(torch.einsum("bqk,bk->bq", probs[2:].mean(1), weights))

            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        sampler.recorder.begin_step(2, (16, 16), torch.device("cpu"))
        sampler.predict_noise(x, t, uncond, cond, weights)
        recorded = sampler.recorder.step_maps()
    finally:
        for h in hooks:
            h.remove()
    assert recorded.shape == (2, 8, 8) and len(maps) == 3  # down 1, up 0 (x2 layers)
    reference = torch.stack(maps).mean(0).view(2, 8, 8)
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=1e-4)
    # "aquarium fish" is two tokens: weights 1/2 each
    assert sorted(weights[1][weights[1] > 0].tolist()) == [0.5, 0.5]

    mask = normalize_mask(recorded)
    up = upsample_mask(mask, (16, 16))
    assert up.shape == (2, 1, 16, 16)
    assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0
    for a, m in zip(recorded.flatten(1), mask.flatten(1), strict=True):
        order = torch.argsort(a)
        assert torch.all(m[order][1:] >= m[order][:-1])  # larger attention, larger mask
        assert float(m[a.argmax()]) == 1.0 and float(m[a.argmin()]) == 0.0


def test_aig_uses_the_mask_and_ig_does_not(sampler: GuidedSampler) -> None:
    item = SampleItem(guide=_guide(), class_id=3, class_name="cat", seed=SEED)
    runs = {
        mode: sampler([item], GenerationOptions(mode=mode, num_inference_steps=3, grad_steps=0))[0].latent
        for mode in (Mode.ig, Mode.aig, Mode.random)
    }
    assert not torch.allclose(runs[Mode.ig], runs[Mode.aig])
    assert not torch.allclose(runs[Mode.aig], runs[Mode.random])


# ---------------------------------------------------------------- eq. 9-11
def test_contrastive_loss_is_eq9_on_hand_made_latents() -> None:
    x0 = torch.zeros(2, 4, 2, 2)  # D = 16
    bank = torch.zeros(2, 3, 16)
    bank[0, 0], bank[0, 1], bank[0, 2] = 0.5, 1.0, 3.0  # distances 2, 4, 12
    bank[1, 0] = 1.0  # item 1 has one real entry, distance 4
    valid = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss = contrastive_loss(x0, bank, valid, margin=5.0)
    torch.testing.assert_close(loss, torch.tensor([(3.0 + 1.0 + 0.0) / 3, 1.0]))
    assert torch.all(contrastive_loss(x0, bank, valid, margin=1.5) == 0)  # all farther than rho
    x1 = torch.randn(1, 4, 2, 2)
    b1 = torch.randn(1, 5, 16)
    direct = (3.0 - (x1.flatten(1)[:, None] - b1).norm(dim=2)).clamp(min=0).mean(1)
    torch.testing.assert_close(contrastive_loss(x1, b1, torch.ones(1, 5), 3.0), direct, atol=1e-5, rtol=1e-5)


def test_update_size_for_both_norms_by_hand() -> None:
    c = torch.zeros(2, 3, 2)  # 2 items, 3 tokens, D = 2
    grad = torch.tensor(
        [
            [[3.0, 0.0], [4.0, 0.0], [0.0, 0.0]],  # channel 0: norm 5 over tokens
            [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    )  # channel 1 only
    # token (released code, F.normalize over dim 1): each channel scaled to norm 1 over the tokens
    token = normalized_update(c, grad, lr=0.1, norm="token")
    torch.testing.assert_close(token[0], -0.1 * torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(token[1], -0.1 * torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    # global (paper text): the item's whole gradient scaled to norm 1
    flat = normalized_update(c, grad, lr=0.1, norm="global")
    torch.testing.assert_close(flat[0], -0.1 * grad[0] / 5.0)
    torch.testing.assert_close(flat[1], -0.1 * grad[1])
    # on an SD-shaped embedding the token norm moves lr*sqrt(D), the global one lr
    big = torch.randn(2, 77, 64)
    g = torch.randn(2, 77, 64) * torch.tensor([1e-4, 0.0]).view(2, 1, 1)
    t, f = normalized_update(big, g, 0.05, "token"), normalized_update(big, g, 0.05, "global")
    assert float((big - t)[0].norm()) == pytest.approx(0.05 * 8.0, rel=1e-4)
    assert float((big - f)[0].norm()) == pytest.approx(0.05, rel=1e-4)
    assert torch.equal(t[1], big[1]) and torch.equal(f[1], big[1])  # zero gradient: no move
    with pytest.raises(ValueError, match="grad_norm"):
        normalized_update(c, grad, 0.1, norm="cosine")


def test_classifier_input_is_the_decoded_image_in_0_1_normalised_once() -> None:
    """Eq. 10's classifier sees (y - mean) / std of the decoded image y = (x / 2 + 0.5) clamped to
    [0, 1], as it saw its training images. Not the released code's: it maps y into [0, 1] and then
    applies normalize_sd2cls, which expects [-1, 1], to y again: (0.5 y + 0.5 - mean) / std, a
    half-contrast image shifted up (docs/architecture.md 5)."""
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)  # VAE output
    y = torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 2, 2)  # in [0, 1], clamped
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    got = classifier_input(x, 2, mean, std)
    torch.testing.assert_close(got, (y - m) / s)
    released = (0.5 * y + 0.5 - m) / s  # guided_gen.py l. 301 then l. 303 (normalize_sd2cls, l. 114)
    assert float((got - released).abs().max()) > 1.0  # a black pixel: -mean/std, not (0.5 - mean)/std
    torch.testing.assert_close(got[0, :, 0, 0], -torch.tensor(mean) / torch.tensor(std))
    # resized to the classifier's input (antialiased: 2x2 -> 1x1 is the mean), then normalised
    torch.testing.assert_close(classifier_input(x, 1, mean, std), (y.mean() - m) / s)


class CountingClassifier(torch.nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = build_classifier("simple_cnn", num_classes).eval()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def _loss_at(sampler, x, t, post, uncond, cond, weights, rows, targets):
    pred = sampler.predict_noise(x, t, uncond, cond, weights, rows)
    x0 = post.predict_x0(x, cfg_noise(pred.uncond, pred.cond, 7.5))
    return sampler.guidance_loss(x0[rows], targets), (pred.leaves[0] if pred.leaves else None), x0


@pytest.mark.parametrize("norm", ["token", "global"])
@pytest.mark.parametrize("part", ["contrastive", "adversarial", "both"])
def test_one_small_update_of_c_lowers_L(sampler: GuidedSampler, part: str, norm: str) -> None:
    """Item 0 always has the contrastive term; item 1 has ``part``: the adversarial-only case
    raises the classifier's loss on item 1 while item 0 moves away from its bank."""
    uncond, cond, weights = _embeds(sampler, ["cat", "dog"])
    scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
    scheduler.set_timesteps(40)
    t = scheduler.timesteps[30]
    post = PosteriorStep.at(scheduler, t)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.3
    rows = torch.tensor([0, 1])
    with torch.no_grad():
        pred = sampler.predict_noise(x, t, uncond, cond, weights)
        x0 = post.predict_x0(x, cfg_noise(pred.uncond, pred.cond, 7.5))
    bank = x0.flatten(1)[:, None] + 0.5 * torch.randn(2, 6, 1024, generator=torch.Generator().manual_seed(6))
    item1_contra = part in ("contrastive", "both")
    clf = CountingClassifier()
    targets = GradientTargets(
        class_ids=torch.tensor([3, 5]),
        bank=bank,
        valid=torch.stack([torch.ones(6), torch.full((6,), float(item1_contra))]),
        adversarial=torch.tensor([False, part != "contrastive"]),
        margin=200.0,
        adv_weight=0.1,
        classifier=Classifier(clf, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )
    before, leaf, x0_before = _loss_at(sampler, x, t, post, uncond, cond, weights, rows, targets)
    (grad,) = torch.autograd.grad(before.total.sum(), leaf)
    lr = 1e-2 if norm == "global" else 1e-3
    new_cond = cond.index_copy(0, rows, normalized_update(leaf.detach(), grad, lr=lr, norm=norm))
    with torch.no_grad():
        after, _, x0_after = _loss_at(sampler, x, t, post, uncond, new_cond, weights, rows, targets)
    assert torch.all(after.total < before.total), (before.total, after.total)
    d_before = (x0_before.detach().flatten(1)[:, None] - bank).norm(dim=2).mean(1)
    d_after = (x0_after.flatten(1)[:, None] - bank).norm(dim=2).mean(1)
    assert d_after[0] > d_before[0]  # item 0: farther from its bank
    if part == "adversarial":  # item 1: no bank term, and the classifier's CE went up
        assert float(after.contra[1]) == 0.0 == float(before.contra[1].detach())
        assert float(-after.adv[1]) > float(-before.adv[1].detach())
    if part == "contrastive":
        assert d_after[1] > d_before[1]
        assert clf.calls == 0
    else:
        assert clf.calls == 2  # once before, once after: only for the adversarial item


def test_items_of_one_job_repel_each_other_in_a_batch(sampler: GuidedSampler) -> None:
    """The live bank: two same-class items of one job are each other's bank entries (detached)."""
    opts = GenerationOptions(mode=Mode.actgen, num_inference_steps=4, grad_steps=3, lr=0.5)

    def pair(group: str | None, other_class: int = 3) -> list:
        items = [
            SampleItem(guide=_guide(1), class_id=3, class_name="cat", seed=SEED, bank_group=group),
            SampleItem(
                guide=_guide(2), class_id=other_class, class_name="cat", seed=SEED + 1, bank_group=group
            ),
        ]
        return sampler(items, opts)

    alone, together = pair(None), pair("job-1")
    assert all(o.record.grad_records == [] for o in alone)  # no bank, no peers: no gradient step
    assert all(
        len(o.record.grad_records) == 3 and max(r.l_contra for r in o.record.grad_records) > 0
        for o in together
    )
    assert float((together[0].latent - together[1].latent).norm()) > float(
        (alone[0].latent - alone[1].latent).norm()
    )
    assert all(o.record.grad_records == [] for o in pair("job-1", other_class=4))  # another class: no peer


def test_adv_prob_zero_never_calls_the_classifier(sampler: GuidedSampler) -> None:
    clf = CountingClassifier()
    classifier = Classifier(clf, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    items = [
        SampleItem(guide=_guide(i), class_id=i, class_name=n, seed=i) for i, n in enumerate(["cat", "dog"])
    ]
    banks = {0: torch.randn(4, 4, 16, 16), 1: torch.randn(4, 4, 16, 16)}
    opts = GenerationOptions(mode=Mode.actgen, num_inference_steps=3, grad_steps=2, adv_prob=0.0)
    outs = sampler(with_banks(items, banks), opts, classifier=classifier)
    assert clf.calls == 0
    assert all(len(o.record.grad_records) == 2 and o.record.grad_records[0].l_adv is None for o in outs)
    # adv_prob 1: one classifier call per gradient step for the batch, predictions recorded
    outs = sampler(with_banks(items, banks), opts.model_copy(update={"adv_prob": 1.0}), classifier=classifier)
    assert clf.calls == 2
    assert all(o.record.adversarial and o.record.grad_records[1].prediction is not None for o in outs)
