"""Each equation of the sampler against a reference computed here, on the tiny model (eq. 4-11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from actgen_generator.attention import RecordingAttnProcessor, normalize_mask, upsample_mask
from actgen_generator.guidance import (
    PosteriorStep,
    cfg_noise,
    contrastive_loss,
    fewshot_strength,
    gamma,
    normalized_update,
)
from actgen_generator.sampler import Classifier, GradientTargets, GuidedSampler, SampleItem
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
    eps_u, eps_c, _ = sampler.predict_noise(x, t, uncond, cond, weights)
    ref_u = _unet(sampler, x, t, uncond)
    ref_c = _unet(sampler, x, t, cond)
    s = 15.0
    torch.testing.assert_close(cfg_noise(eps_u, eps_c, s), ref_u + s * (ref_c - ref_u), atol=1e-4, rtol=1e-4)
    # the graph-keeping split of a gradient step gives the same noise
    eps_u2, eps_c2, leaf = sampler.predict_noise(x, t, uncond, cond, weights, torch.tensor([1]))
    torch.testing.assert_close(eps_u2, ref_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_c2, ref_c, atol=1e-5, rtol=1e-5)
    assert leaf.requires_grad and leaf.shape == (1, *cond.shape[1:])
    assert eps_c2.requires_grad and not eps_u2.requires_grad


# ---------------------------------------------------------------- eq. 5-8
def _reference_run(sampler: GuidedSampler, mode: Mode, steps: int, scale: float, strength: float):
    """The sampler's loop written out with diffusers' own DDPMScheduler.step as the DDPM step."""
    g = torch.Generator().manual_seed(SEED)
    shape = (4, 16, 16)
    x = torch.randn(shape, generator=g)[None]
    x_guide = torch.randn(shape, generator=g)[None]
    guide_eps = torch.randn(shape, generator=g)[None]
    pixels = torch.from_numpy(_guide()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        dist = sampler.vae.encode(pixels).latent_dist
    guide = (dist.mean + dist.std * guide_eps) * sampler.vae.config.scaling_factor
    uncond, cond, _ = _embeds(sampler, ["cat"])
    scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    for k, t in enumerate(scheduler.timesteps):
        eps_u, eps_c = _unet(sampler, x, t, uncond), _unet(sampler, x, t, cond)
        eps = eps_u + scale * (eps_c - eps_u)
        state = g.get_state()
        x_prev = scheduler.step(eps, t, x, generator=g).prev_sample
        if mode is not Mode.random:
            # eq. 6: the same posterior step with x0 := guide, fed as the eps that predicts it
            a = scheduler.alphas_cumprod[t]
            eps_guide = (x_guide - a.sqrt() * guide) / (1 - a).sqrt()
            g_same = torch.Generator().set_state(state)
            x_guide = scheduler.step(eps_guide, t, x_guide, generator=g_same).prev_sample
            gam = 1 - math.exp(k - strength) / (1 + math.exp(k - strength))
            x_prev = x_prev + gam * 1.0 * (x_guide - x_prev)  # m = 1 for ig
        x = x_prev
    return x[0]


@pytest.mark.parametrize("mode", [Mode.ig, Mode.random])
def test_guided_steps_match_ddpm_posterior_plus_image_guidance(sampler: GuidedSampler, mode: Mode) -> None:
    opts = GenerationOptions(mode=mode, num_inference_steps=3, grad_steps=0,
                             guidance_scale=5.0, image_guidance_strength=1.5)
    out = sampler([SampleItem(guide=_guide(), class_id=3, class_name="cat", seed=SEED)], opts)[0]
    ref = _reference_run(sampler, mode, steps=3, scale=5.0, strength=1.5)
    torch.testing.assert_close(out.latent, ref, atol=2e-4, rtol=2e-4)


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
        torch.testing.assert_close(post.step(post.predict_x0(x, eps), x, z), out.prev_sample, atol=1e-5, rtol=1e-5)


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
    assert recording == {n for n in procs if "attn2" in n and (n.startswith("down_blocks.1") or n.startswith("up_blocks.0"))}
    assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if n not in recording)


def test_mask_follows_recorded_class_token_attention(sampler: GuidedSampler) -> None:
    uncond, cond, weights = _embeds(sampler, ["cat", "aquarium fish"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(401)
    # independent reference: softmax(q k^T) of the class tokens at the recording layers, cond rows only
    maps = []
    hooks = []
    for name, module in sampler.unet.named_modules():
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
    for a, m in zip(recorded.flatten(1), mask.flatten(1)):
        order = torch.argsort(a)
        assert torch.all(m[order][1:] >= m[order][:-1])  # larger attention, larger mask
        assert float(m[a.argmax()]) == 1.0 and float(m[a.argmin()]) == 0.0


def test_aig_uses_the_mask_and_ig_does_not(sampler: GuidedSampler) -> None:
    item = SampleItem(guide=_guide(), class_id=3, class_name="cat", seed=SEED)
    runs = {mode: sampler([item], GenerationOptions(mode=mode, num_inference_steps=3, grad_steps=0))[0].latent
            for mode in (Mode.ig, Mode.aig, Mode.random)}
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


def test_update_of_c_has_l2_norm_lr() -> None:
    c = torch.randn(3, 77, 32)
    grad = torch.randn(3, 77, 32) * torch.tensor([1e-3, 1.0, 0.0]).view(3, 1, 1)
    new = normalized_update(c, grad, lr=0.05)
    norms = (c - new).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[:2], torch.tensor([0.05, 0.05]))
    assert torch.equal(new[2], c[2])  # zero gradient: no move


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
    eps_u, eps_c, leaf = sampler.predict_noise(x, t, uncond, cond, weights, rows)
    x0 = post.predict_x0(x, cfg_noise(eps_u, eps_c, 7.5))
    return sampler.guidance_loss(x0[rows], targets), leaf, x0


@pytest.mark.parametrize("part", ["contrastive", "adversarial", "both"])
def test_one_small_update_of_c_lowers_L(sampler: GuidedSampler, part: str) -> None:
    uncond, cond, weights = _embeds(sampler, ["cat", "dog"])
    scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
    scheduler.set_timesteps(40)
    t = scheduler.timesteps[30]
    post = PosteriorStep.at(scheduler, t)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.3
    rows = torch.tensor([0, 1])
    with torch.no_grad():
        eps_u, eps_c, _ = sampler.predict_noise(x, t, uncond, cond, weights)
        x0 = post.predict_x0(x, cfg_noise(eps_u, eps_c, 7.5))
    use_bank = part in ("contrastive", "both")
    bank = (x0.flatten(1)[:, None] + 0.5 * torch.randn(2, 6, 1024, generator=torch.Generator().manual_seed(6)))
    clf = CountingClassifier()
    targets = GradientTargets(
        class_ids=torch.tensor([3, 5]), bank=bank, valid=torch.full((2, 6), float(use_bank)),
        adversarial=torch.tensor([part != "contrastive"] * 2), margin=200.0, adv_weight=0.1,
        classifier=Classifier(clf, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )
    before, leaf, x0_before = _loss_at(sampler, x, t, post, uncond, cond, weights, rows, targets)
    (grad,) = torch.autograd.grad(before.total.sum(), leaf)
    new_cond = cond.index_copy(0, rows, normalized_update(leaf.detach(), grad, lr=1e-2))
    with torch.no_grad():
        after, _, x0_after = _loss_at(sampler, x, t, post, uncond, new_cond, weights, rows, targets)
    assert torch.all(after.total < before.total), (before.total, after.total)
    if part == "adversarial":  # the classifier's CE went up
        assert torch.all(-after.adv > -before.adv.detach())
        assert clf.calls == 2
    if part == "contrastive":  # farther from the bank
        d_before = (x0_before.detach().flatten(1)[:, None] - bank).norm(dim=2).mean(1)
        d_after = (x0_after.flatten(1)[:, None] - bank).norm(dim=2).mean(1)
        assert torch.all(d_after > d_before)
        assert clf.calls == 0


def test_adv_prob_zero_never_calls_the_classifier(sampler: GuidedSampler) -> None:
    clf = CountingClassifier()
    classifier = Classifier(clf, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    items = [SampleItem(guide=_guide(i), class_id=i, class_name=n, seed=i) for i, n in enumerate(["cat", "dog"])]
    banks = {0: torch.randn(4, 4, 16, 16), 1: torch.randn(4, 4, 16, 16)}
    opts = GenerationOptions(mode=Mode.actgen, num_inference_steps=3, grad_steps=2, adv_prob=0.0)
    outs = sampler(items, opts, banks=banks, classifier=classifier)
    assert clf.calls == 0
    assert all(len(o.record.grad_records) == 2 and o.record.grad_records[0].l_adv is None for o in outs)
    # adv_prob 1: one classifier call per gradient step for the batch, predictions recorded
    outs = sampler(items, opts.model_copy(update={"adv_prob": 1.0}), banks=banks, classifier=classifier)
    assert clf.calls == 2
    assert all(o.record.adversarial and o.record.grad_records[1].prediction is not None for o in outs)
