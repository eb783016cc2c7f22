"""The guidance-overhead bench's code path (bench/sd21.py) and the sampler's classifier-size decode.

The GPU section of ``make bench`` (SD 2.1 architecture, 512 px, fp16/bf16) cannot run here; these
run the same functions on the CPU with the tiny model and check what they report, never a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actgen_generator.sampler import Classifier, GuidedSampler, SampleItem, with_banks
from actgen_shared.architectures import build_classifier
from actgen_shared.labels import CIFAR10
from actgen_shared.schemas import GenerationOptions, Mode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import sd21  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _classifier(size: int) -> Classifier:
    torch.manual_seed(0)
    return Classifier(build_classifier("simple_cnn", 10).eval(), size, (0.5,) * 3, (0.5,) * 3)


def _items(n: int) -> list[SampleItem]:
    rng = np.random.default_rng(0)
    return [
        SampleItem(
            guide=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            class_id=i % 10,
            class_name=CIFAR10[i % 10],
            seed=10 + i,
        )
        for i in range(n)
    ]


ALL_ADVERSARIAL = GenerationOptions(
    mode=Mode.actgen, num_inference_steps=3, grad_steps=2, adv_prob=1.0, bank_sample=0
)


def test_classifier_size_decode_is_the_full_decode_when_the_classifier_is_as_large(sampler) -> None:
    """adv_decode='classifier' with a classifier input of the full size changes nothing, bit for bit."""
    classifier = _classifier(sampler.model.native_size)
    full = sampler(_items(2), ALL_ADVERSARIAL, classifier=classifier)
    sampler.adv_decode = "classifier"
    try:
        same = sampler(_items(2), ALL_ADVERSARIAL, classifier=classifier)
    finally:
        sampler.adv_decode = "full"
    for a, b in zip(full, same, strict=True):
        assert torch.equal(a.latent, b.latent)
        assert a.record == b.record


def test_classifier_size_decode_decodes_a_smaller_latent_and_still_guides(sampler) -> None:
    """With an 8 px classifier the decode gets a 4x4 latent (8 px / VAE scale 2), not 16x16."""
    classifier = _classifier(8)
    seen: list[tuple[int, ...]] = []
    hook = sampler.model.pipe.vae.decoder.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape)
    )
    try:
        full = sampler(_items(2), ALL_ADVERSARIAL, classifier=classifier)
        n_full = len(seen)
        sampler.adv_decode = "classifier"
        small = sampler(_items(2), ALL_ADVERSARIAL, classifier=classifier)
    finally:
        sampler.adv_decode = "full"
        hook.remove()
    latent = sampler.model.native_size // sampler.vae_scale_factor
    assert {tuple(s[-2:]) for s in seen[:n_full]} == {(latent, latent)}
    # the guided steps' decodes are 4x4; the final decode of the images stays full size
    assert [tuple(s[-2:]) for s in seen[n_full:]] == [(4, 4), (4, 4), (latent, latent)]
    assert all(o.image.shape == (sampler.model.native_size,) * 2 + (3,) for o in small)
    assert all(len(o.record.grad_records) == 2 and o.record.adversarial for o in small)
    assert not torch.equal(full[0].latent, small[0].latent)  # a different (approximate) gradient


def test_unknown_adv_decode_is_refused(sampler) -> None:
    with pytest.raises(ValueError, match="adv_decode"):  # refused before it touches the UNet
        GuidedSampler(sampler.model, adv_decode="half")  # type: ignore[arg-type]


def test_bench_model_follows_the_protocol_and_reports_every_field(sampler) -> None:
    """bench_model, the GPU section's function, at tiny size on the CPU: a warm-up per cell, rotated
    rounds, medians and per-round ratios, parts that add up, FLOPs and their floor."""
    setup = sd21.Setup(
        size=sampler.model.native_size, batches=(2, 1), steps=3, grad_steps=2, rounds={2: 3, 1: 2}
    )
    variants = ("full", "cond", "contrastive")
    order: list[tuple[str, int, bool]] = []
    original = sampler.__class__.__call__

    def spy(self, items, options, *args, **kwargs):  # type: ignore[no-untyped-def]
        order.append(
            (options.mode.value + str(options.update_uncond) + str(options.adv_prob), len(items), True)
        )
        return original(self, items, options, *args, **kwargs)

    saved: list[dict] = []
    sampler.__class__.__call__ = spy
    try:
        r = sd21.bench_model(
            sampler.model, setup, variants, sampler=sampler, on_cell=lambda p: saved.append(p)
        )
    finally:
        sampler.__class__.__call__ = original
    assert sampler.timer is None and sampler.grad_checkpointing == "auto"  # put back as it was
    assert r["batches"] == [2, 1] and r["device"] == "cpu" and r["rounds"] == {"b2": 3, "b1": 2}
    assert r["grad_checkpointing"] == "off" and not r["cut"]
    assert len(saved) == 5  # after every round: 3 at b2, 2 at b1
    # batch 2: 4 cells x (warm-up + FLOP count) then 3 rounds of 4 calls, each round rotated by one
    b2 = [o[0] for o in order if o[1] == 2]
    cells = b2[0:8:2]
    assert b2[:8] == [c for c in cells for _ in range(2)]
    rounds = [b2[8 + 4 * k : 12 + 4 * k] for k in range(3)]
    assert rounds == [cells, cells[1:] + cells[:1], cells[2:] + cells[:2]]
    for variant in variants:
        v = r["variants"][variant]
        spec = sd21.VARIANT_SPECS[variant]
        assert (v["adv_decode"], v["update_uncond"], v["adv_decoder"]) == (
            spec.adv_decode,
            spec.update_uncond,
            spec.adv_decoder,
        )
        assert set(v["cells"]) == {"random_b1", "actgen_b1", "random_b2", "actgen_b2"}
        for c in v["cells"].values():
            assert c["min"] <= c["seconds_per_image"] <= c["max"] and c["first_call_s"] > 0
            assert c["parts_add_up"] and abs(c["parts_cover"] - 1) <= sd21.PART_TOLERANCE
            assert c["tflop_per_image"] > 0 and c["tflops"] > 0 and c["peak_mb"] > 0
        actgen = v["cells"]["actgen_b2"]
        assert len(actgen["per_round"]) == 3
        assert "guided_unet_forward" in actgen["parts_per_image"] and "decode" in actgen["parts_per_image"]
        random = v["cells"]["random_b2"]
        per_round = [a / b for a, b in zip(actgen["per_round"], random["per_round"], strict=True)]
        ratio = v["ratio"]["b2"]
        assert ratio["median"] == pytest.approx(sorted(per_round)[1])  # the median of per-round ratios
        assert ratio["flop_floor"] == pytest.approx(actgen["tflop_per_image"] / random["tflop_per_image"])
        assert ratio["flop_floor"] > 1.0
        assert v["step_loop_ratio"] == pytest.approx(
            sd21.step_loop_ratio(r["plain_step_s"], r["guided_step_s"][variant]["guided_step"], 3, 2)
        )
    # backward through c's rows only is less arithmetic than through the whole CFG batch
    assert (
        r["variants"]["cond"]["ratio"]["b2"]["flop_floor"]
        < r["variants"]["full"]["ratio"]["b2"]["flop_floor"]
    )
    parts = r["guided_step_s"]["full"]
    assert set(parts) == {
        "unet_forward",
        "decode_forward",
        "classifier_forward",
        "classifier_backward",
        "decode_backward",
        "unet_backward",
        "guided_step",
    }
    assert parts["guided_step"] == pytest.approx(sum(v for k, v in parts.items() if k != "guided_step"))
    contrastive = r["guided_step_s"]["contrastive"]
    assert contrastive["decode_forward"] == contrastive["classifier_forward"] == 0.0
    printed = sd21.table("tiny", r)
    assert all(variant in printed for variant in variants) and "floor" in printed


def test_the_tiny_decoders_share_of_a_guided_step_is_split_out(sampler, tmp_path) -> None:
    """With a tiny decoder (TAESD's architecture here), the split's decode parts are its own."""
    import shutil

    from actgen_generator.diffusers_classes import AutoencoderTiny
    from actgen_generator.pipeline import TINY_VAE_DIR, load_pipeline

    folder = tmp_path / "model"
    shutil.copytree(sampler.model.model_id, folder)
    AutoencoderTiny(
        decoder_block_out_channels=(8, 8),
        num_decoder_blocks=(1, 1),
        encoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
    ).save_pretrained(str(folder / TINY_VAE_DIR), safe_serialization=True)
    model = load_pipeline(str(folder), device="cpu")
    setup = sd21.Setup(size=model.native_size, batches=(2,), steps=2, grad_steps=1, rounds=1)
    r = sd21.bench_model(model, setup, ("full", "fast"))
    assert model.tiny_vae is not None
    for name in ("full", "fast"):
        share = r["variants"][name]["decoder_share_of_guided_step"]
        parts = r["guided_step_s"][name]
        assert share == pytest.approx(
            (parts["decode_forward"] + parts["decode_backward"]) / parts["guided_step"]
        )
    assert r["variants"]["fast"]["cells"]["actgen_b2"]["seconds_per_image"] > 0


def test_step_loop_ratio_counts_the_guided_steps_extra_time() -> None:
    # 8 steps of 1 s, 2 of them guided at 3 s: (8 + 2 * 2) / 8
    assert sd21.step_loop_ratio(1.0, 3.0, 8, 2) == pytest.approx(1.5)
    assert sd21.step_loop_ratio(2.0, 2.0, 40, 10) == pytest.approx(1.0)


def test_unknown_bench_variant_is_refused(sampler) -> None:
    setup = sd21.Setup(size=sampler.model.native_size, batches=(1,), steps=2, grad_steps=1, rounds=1)
    with pytest.raises(ValueError, match="halfsize"):
        sd21.bench_model(sampler.model, setup, ("halfsize",), sampler=sampler)


def test_guided_step_split_gives_the_samplers_gradient(sampler) -> None:
    """The staged backward of the split (classifier, decode, UNet) is the sampler's one autograd.grad."""
    classifier = _classifier(sampler.model.native_size)
    items = with_banks(_items(2), {c: torch.randn(3, 4, 16, 16) for c in range(10)})
    opts = GenerationOptions(mode=Mode.actgen, num_inference_steps=3, grad_steps=1, adv_prob=1.0)
    captured: list[torch.Tensor] = []
    original = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        grads = original(outputs, inputs, *args, **kwargs)
        captured.append(grads[0])
        return grads

    torch.autograd.grad = spy  # type: ignore[assignment]
    try:
        sd21.guided_step_split(sampler, items, opts, classifier)
        staged = captured[-1]
        captured.clear()
        draws = [sampler._draw(item, opts) for item in items]
        uncond, cond, weights = sampler._encode_prompts(items)
        plan = sampler._gradient_plan(items, draws, opts, classifier, (4, 16, 16))
        from diffusers import DDPMScheduler

        from actgen_generator.guidance import PosteriorStep, cfg_noise

        scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
        scheduler.set_timesteps(3)
        t = scheduler.timesteps[0]
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        sampler.recorder.begin_step(2, (16, 16), sampler.device)
        pred = sampler.predict_noise(
            x, t, uncond, cond, weights, plan.rows, sampler.resolve(opts).update_uncond
        )
        x0 = PosteriorStep.at(scheduler, t).predict_x0(
            x, cfg_noise(pred.uncond, pred.cond, sampler.resolve(opts).guidance_scale)
        )
        loss = sampler.guidance_loss(x0[plan.rows], plan.targets(x0))
        (direct,) = original(loss.total.sum(), pred.leaves[:1], retain_graph=True)
        sampler.recorder.step_maps()
    finally:
        torch.autograd.grad = original  # type: ignore[assignment]
    assert direct.abs().sum() > 0
    torch.testing.assert_close(staged, direct, rtol=1e-4, atol=1e-6)
