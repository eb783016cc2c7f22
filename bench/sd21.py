"""Guidance overhead where the UNet dominates: SD 2.1's architecture, random weights (issue 12, parts 2 and 5).

* ``sd21cpu``: SD 2.1 base's UNet/VAE/text encoder (DESIGN.md 9, built locally, nothing
  downloaded) at a size a 2-core CPU runs in minutes: 128 px, batch 2, 8 steps, gradient guidance
  on the first 2 (the paper's 10 of 40), every guided item adversarial against a classifier with
  the paper's input/output ratio (224 of 512 px -> 56 of 128). Reports actgen / random per
  variant (the cuts below), a guided step split into its parts, and peak RSS.
* ``sd21gpu``: the same code at 512 px, 40 steps (10 guided), fp16 and bf16, batch 1, 4, 8:
  s/image per mode, guidance overhead, peak VRAM, images/s per GPU (the README's sizing table).

Variants: ``full`` (decode x0_hat at full size for eq. 10, today's default), ``clfsize``
(``GuidedSampler(adv_decode="classifier")``: decode a latent shrunk to the classifier's input)
and, when asked for, ``channels_last`` (UNet and VAE in channels-last memory). ``clfsize`` also reports how far
its classifier probabilities and pixels are from the full decode's on the same x0_hat.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.run import guide_items

CPU_SIZE, CPU_BATCH, CPU_STEPS, CPU_GRAD_STEPS = 128, 2, 8, 2
GPU_SIZE, GPU_BATCHES, GPU_STEPS, GPU_GRAD_STEPS = 512, (1, 4, 8), 40, 10
GPU_DTYPES = ("float16", "bfloat16")
CLASSIFIER_FRACTION = 224 / 512  # the paper's classifier input over its generation size
ADV_PROB = 1.0  # every guided item decodes and classifies: the overhead's upper end
TARGET_SD21 = 1.2
BANK_PER_CLASS = 16
VARIANTS = ("full", "clfsize")  # "channels_last" too with run_cpu(variants=...)
SAME_RANDOM = ("full", "clfsize")  # variants whose `random` runs are the same computation


@dataclass
class Setup:
    """One measurement's sizes."""

    size: int
    batches: tuple[int, ...]
    steps: int
    grad_steps: int
    repeats: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (2**12) / 2**20  # resident pages (4 KiB)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory of the block: VRAM allocated on CUDA, else RSS polled every 5 ms (MiB)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    peak = [_rss_mb()]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mb"] = max(peak[0], _rss_mb())


def _options(mode: str, setup: Setup, native: int) -> Any:
    """The job options of one run; the size only when it is not the model's own (>= 64 px)."""
    from actgen_shared.schemas import GenerationOptions

    size = None if setup.size == native else setup.size
    return GenerationOptions(
        mode=mode,
        num_inference_steps=setup.steps,
        grad_steps=setup.grad_steps,
        adv_prob=ADV_PROB if mode == "actgen" else 0.0,
        height=size,
        width=size,
    )


def _classifier(model: Any, size: int) -> Any:
    from actgen_generator.sampler import Classifier
    from actgen_shared.architectures import build_classifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build_classifier("simple_cnn", 10).eval().requires_grad_(False)
    input_size = max(8, round(size * CLASSIFIER_FRACTION))
    return Classifier(module.to(model.device), input_size, (0.5,) * 3, (0.5,) * 3)


def _banks(shape: tuple[int, ...], device: torch.device) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {c: torch.randn(BANK_PER_CLASS, *shape, generator=g).to(device) for c in range(10)}


def _latent_shape(model: Any, size: int) -> tuple[int, int, int]:
    side = size // int(model.pipe.vae_scale_factor)
    return (int(model.pipe.unet.config.in_channels), side, side)


def guided_step_split(sampler: Any, items: list[Any], options: Any, classifier: Any) -> dict[str, float]:
    """Seconds of one guided step's parts, staged so each backward is timed on its own.

    The same functions as the sampler's step (predict_noise with grad rows, plan targets,
    contrastive loss, ``adv_latents`` + VAE decode, classifier), the chain rule applied in three
    stages (classifier, decode, UNet) instead of one ``autograd.grad``: the same gradient.
    """
    from diffusers import DDPMScheduler

    from actgen_generator.guidance import (
        PosteriorStep,
        adversarial_loss,
        cfg_noise,
        classifier_input,
        contrastive_loss,
    )

    device = sampler.device
    size = options.height or sampler.model.native_size
    shape = _latent_shape(sampler.model, size)
    draws = [sampler._draw(item, options) for item in items]
    uncond, cond, weights = sampler._encode_prompts(items)
    plan = sampler._gradient_plan(items, draws, options, classifier, shape)
    assert plan is not None, "the split needs guided items"
    scheduler = DDPMScheduler.from_config(sampler.model.pipe.scheduler.config)
    scheduler.set_timesteps(options.num_inference_steps, device=device)
    t = scheduler.timesteps[0]
    post = PosteriorStep.at(scheduler, t)
    x = torch.randn(len(items), *shape, generator=torch.Generator().manual_seed(0)).to(device)
    marks: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        _sync(device)
        now = time.perf_counter()
        marks[name] = now - since
        return now

    _sync(device)
    start = time.perf_counter()
    sampler.recorder.begin_step(len(items), shape[1:], device)
    pred = sampler.predict_noise(x, t, uncond, cond, weights, plan.rows, options.update_uncond)
    x0 = post.predict_x0(x, cfg_noise(pred.uncond, pred.cond, options.guidance_scale))
    x0_rows = x0[plan.rows]
    now = mark("unet_forward", start)
    x0_leaf = x0_rows.detach().requires_grad_(True)
    targets = plan.targets(x0)
    contra = contrastive_loss(x0_leaf, targets.bank, targets.valid, targets.margin)
    adv_rows = targets.adv_rows
    decoded = sampler.vae.decode(
        sampler.adv_latents(x0_leaf[adv_rows], classifier.input_size), return_dict=False
    )[0]
    now = mark("decode_forward", now)
    image_leaf = decoded.detach().requires_grad_(True)
    logits = classifier.module(
        classifier_input(image_leaf, classifier.input_size, classifier.mean, classifier.std)
    )
    adv = adversarial_loss(logits, targets.class_ids[adv_rows])
    now = mark("classifier_forward", now)
    (g_image,) = torch.autograd.grad(targets.adv_weight * adv.sum(), image_leaf)
    now = mark("classifier_backward", now)
    g_x0 = torch.autograd.grad([contra.sum(), decoded], [x0_leaf], [None, g_image])[0]
    now = mark("decode_backward", now)
    torch.autograd.grad(x0_rows, pred.leaves, g_x0, allow_unused=True)
    mark("unet_backward", now)
    sampler.recorder.step_maps()
    marks["guided_step"] = sum(marks.values())
    return marks


def plain_step_seconds(sampler: Any, items: list[Any], options: Any) -> float:
    """Seconds of one unguided step's UNet call (the whole CFG batch, no graph)."""
    shape = _latent_shape(sampler.model, options.height or sampler.model.native_size)
    uncond, cond, weights = sampler._encode_prompts(items)
    x = torch.randn(len(items), *shape, generator=torch.Generator().manual_seed(0)).to(sampler.device)
    t = torch.tensor(500, device=sampler.device)
    sampler.recorder.begin_step(len(items), shape[1:], sampler.device)
    _sync(sampler.device)
    start = time.perf_counter()
    sampler.predict_noise(x, t, uncond, cond, weights)
    _sync(sampler.device)
    sampler.recorder.step_maps()
    return time.perf_counter() - start


def decode_agreement(model: Any, size: int, batch: int = 4) -> dict[str, float]:
    """How far the classifier-size decode is from the full one on the same latents.

    Max absolute difference of the classifier's softmax probabilities, top-1 agreement, and mean
    absolute pixel difference (0..255) of the classifier's input images, full vs ``clfsize``.
    """
    from actgen_generator.guidance import classifier_input, classifier_size_latents

    classifier = _classifier(model, size)
    shape = _latent_shape(model, size)
    scale = int(model.pipe.vae_scale_factor)
    g = torch.Generator().manual_seed(1)
    # latents of a typical x0_hat magnitude (unscaled: unit variance)
    latents = torch.randn(batch, *shape, generator=g).to(model.device)
    probs: dict[str, torch.Tensor] = {}
    pixels: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in ("full", "clfsize"):
            z = latents if name == "full" else classifier_size_latents(latents, classifier.input_size, scale)
            decoded = model.pipe.vae.decode(z.to(model.dtype), return_dict=False)[0]
            inputs = classifier_input(decoded, classifier.input_size, classifier.mean, classifier.std)
            pixels[name] = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round()
            pixels[name] = F.interpolate(
                pixels[name], size=inputs.shape[-2:], mode="bilinear", align_corners=False, antialias=True
            )
            probs[name] = F.softmax(classifier.module(inputs.float()).float(), dim=1)
    return {
        "prob_max_abs_diff": float((probs["full"] - probs["clfsize"]).abs().max()),
        "top1_agreement": float((probs["full"].argmax(1) == probs["clfsize"].argmax(1)).float().mean()),
        "pixel_mean_abs_diff": float((pixels["full"] - pixels["clfsize"]).abs().mean()),
        "latents": batch,
    }


def bench_model(
    model: Any,
    setup: Setup,
    variants: tuple[str, ...] = ("full",),
    split: bool = True,
    sampler: Any = None,
) -> dict[str, Any]:
    """s/image for random and actgen per batch and variant, interleaved; best of ``repeats``.

    Returns per variant: ``seconds_per_image`` (mode_bB), ``guidance_overhead_ratio`` (actgen /
    random at the largest batch), ``images_per_second`` (actgen, per batch) and peak memory; with
    ``split``, a guided step's parts at the largest batch. ``sampler``: the model's existing one.
    """
    from actgen_generator.sampler import GuidedSampler, with_banks

    device = model.device
    classifier = _classifier(model, setup.size)
    banks = _banks(_latent_shape(model, setup.size), device)
    if sampler is None:  # one per UNet: each installs its own attention recorder on it
        sampler = GuidedSampler(model)
    times: dict[tuple[str, str, int], list[float]] = {}
    peaks: dict[str, float] = {}

    def run(variant: str, mode: str, batch: int) -> float:
        sampler.adv_decode = "classifier" if variant == "clfsize" else "full"
        memory_format = torch.channels_last if variant == "channels_last" else torch.contiguous_format
        model.pipe.unet.to(memory_format=memory_format)
        model.pipe.vae.to(memory_format=memory_format)
        items = with_banks(guide_items(batch, 32), banks, group="bench")
        with peak_memory(device) as peak:
            _sync(device)
            start = time.perf_counter()
            sampler(items, _options(mode, setup, model.native_size), classifier=classifier)
            _sync(device)
            elapsed = time.perf_counter() - start
        key = f"{variant}_{mode}_b{batch}"
        peaks[key] = max(peaks.get(key, 0.0), peak["peak_mb"])
        return elapsed / batch

    run(variants[0], "actgen", setup.batches[0])  # warm-up: first-call allocations and kernels
    for _ in range(setup.repeats):
        for variant in variants:
            for batch in setup.batches:
                for mode in ("random", "actgen"):
                    times.setdefault((variant, mode, batch), []).append(run(variant, mode, batch))
    model.pipe.unet.to(memory_format=torch.contiguous_format)
    model.pipe.vae.to(memory_format=torch.contiguous_format)
    top = max(setup.batches)
    out: dict[str, Any] = {
        "model": model.model_id,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "size_px": setup.size,
        "batches": list(setup.batches),
        "steps": setup.steps,
        "grad_steps": setup.grad_steps,
        "adv_prob": ADV_PROB,
        "bank_per_class": BANK_PER_CLASS,
        "classifier_input_px": classifier.input_size,
        "repeats": setup.repeats,
        "threads": torch.get_num_threads(),
        "memory": "peak VRAM allocated" if device.type == "cuda" else "peak RSS",
        "variants": {},
    }
    # `random` is the same computation under every decode variant (they differ on guided steps
    # only): its fastest run over them is the one baseline, so noise cannot flatter a variant
    shared = [v for v in variants if v in SAME_RANDOM]
    for variant in variants:
        spi = {f"{m}_b{b}": min(times[(variant, m, b)]) for m in ("random", "actgen") for b in setup.batches}
        if variant in SAME_RANDOM:
            spi.update(
                {f"random_b{b}": min(min(times[(v, "random", b)]) for v in shared) for b in setup.batches}
            )
        out["variants"][variant] = {
            "seconds_per_image": spi,
            "seconds_per_image_median": {
                f"{m}_b{b}": statistics.median(times[(variant, m, b)])
                for m in ("random", "actgen")
                for b in setup.batches
            },
            "guidance_overhead_ratio": spi[f"actgen_b{top}"] / spi[f"random_b{top}"],
            "images_per_second": {f"b{b}": 1.0 / spi[f"actgen_b{b}"] for b in setup.batches},
            "peak_memory_mb": {
                k.removeprefix(f"{variant}_"): v for k, v in peaks.items() if k.startswith(f"{variant}_")
            },
        }
    if split:
        items = with_banks(guide_items(top, 32), banks, group="bench")
        opts = _options("actgen", setup, model.native_size)
        out["guided_step_s"] = {}
        for name in ("full", "clfsize"):
            if name in variants:
                sampler.adv_decode = "classifier" if name == "clfsize" else "full"
                parts = [guided_step_split(sampler, items, opts, classifier) for _ in range(2)]
                best = {k: min(p[k] for p in parts) for k in parts[0] if k != "guided_step"}
                out["guided_step_s"][name] = {
                    **best,
                    "guided_step": sum(best.values()),
                }  # fastest of each part
        sampler.adv_decode = "full"
        out["plain_step_s"] = min(plain_step_seconds(sampler, items, opts) for _ in range(2))
        out["guided_rows"] = top
    return out


def run_cpu(repeats: int = 2, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """The ``sd21cpu`` section: SD 2.1 architecture in float32 on the CPU at 128 px."""
    from actgen_generator.pipeline import sd21_architecture_pipeline

    started = time.perf_counter()
    model = sd21_architecture_pipeline("cpu", torch.float32)
    build_s = time.perf_counter() - started
    setup = Setup(CPU_SIZE, (CPU_BATCH,), CPU_STEPS, CPU_GRAD_STEPS, repeats)
    out = bench_model(model, setup, variants)
    if "clfsize" in variants:
        out["clfsize_vs_full"] = decode_agreement(model, setup.size)
    out["build_s"] = build_s
    out["target"] = TARGET_SD21
    out["model_rss_mb"] = _rss_mb()
    return out


def run_gpu(repeats: int = 2, dtypes: tuple[str, ...] = GPU_DTYPES) -> dict[str, Any]:
    """The ``sd21gpu`` section: SD 2.1 architecture at 512 px on CUDA, per dtype and batch."""
    from actgen_generator.pipeline import sd21_architecture_pipeline

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "target": TARGET_SD21, "dtypes": {}}
    for dtype in dtypes:
        model = sd21_architecture_pipeline("cuda", dtype)
        setup = Setup(GPU_SIZE, GPU_BATCHES, GPU_STEPS, GPU_GRAD_STEPS, repeats)
        out["dtypes"][dtype] = bench_model(model, setup, ("full", "clfsize"))
        out["dtypes"][dtype]["clfsize_vs_full"] = decode_agreement(model, GPU_SIZE)
        del model
        torch.cuda.empty_cache()
    return out


def table(name: str, r: dict[str, Any]) -> str:
    """Printable lines for one result of :func:`bench_model`."""
    lines = [
        f"{name}: {r['model']} on {r['device']} ({r['dtype']}, {r['size_px']} px, {r['steps']} steps, "
        f"{r['grad_steps']} guided, adv_prob {r['adv_prob']}, classifier {r['classifier_input_px']} px, "
        f"{r['threads']} threads, best of {r['repeats']})"
    ]
    head = "".join(f"{f'{m} b{b}':>12}" for b in r["batches"] for m in ("random", "actgen"))
    lines.append(f"  {'variant':<14}{head}{'ratio':>8}{'img/s':>8}  {r['memory']} MiB (actgen)")
    top = max(r["batches"])
    for variant, v in r["variants"].items():
        cells = "".join(
            f"{v['seconds_per_image'][f'{m}_b{b}']:>12.3f}"
            for b in r["batches"]
            for m in ("random", "actgen")
        )
        mem = v["peak_memory_mb"].get(f"actgen_b{top}", math.nan)
        lines.append(
            f"  {variant:<14}{cells}{v['guidance_overhead_ratio']:>8.2f}"
            f"{v['images_per_second'][f'b{top}']:>8.2f}  {mem:.0f}"
        )
    for variant, parts in r.get("guided_step_s", {}).items():
        lines.append(
            f"  guided step ({variant}, {r['guided_rows']} rows): "
            + ", ".join(f"{k} {s:.3f}s" for k, s in parts.items())
            + f"; plain step {r['plain_step_s']:.3f}s"
        )
    if "clfsize_vs_full" in r:
        a = r["clfsize_vs_full"]
        lines.append(
            f"  clfsize vs full decode: prob max |diff| {a['prob_max_abs_diff']:.3f}, top-1 agree "
            f"{a['top1_agreement']:.2f}, pixel mean |diff| {a['pixel_mean_abs_diff']:.1f}/255"
        )
    if "target" in r:
        lines.append(f"  target guidance_overhead_ratio <= {r['target']}")
    return "\n".join(lines)
