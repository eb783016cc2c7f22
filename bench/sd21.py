"""Guidance overhead where the UNet dominates: SD 2.1's architecture, random weights (issue 12, parts 2 and 5).

* ``sd21cpu``: SD 2.1 base's UNet/VAE/text encoder (docs/architecture.md 9, built locally, nothing
  downloaded) at a size a 2-core CPU runs in minutes: 128 px, batch 2, 8 steps, gradient guidance
  on the first 2 (the paper's 10 of 40), every guided item adversarial against a classifier with
  the paper's input/output ratio (224 of 512 px -> 56 of 128). Reports actgen / random per
  variant (the cuts below), a guided step split into its parts, and peak RSS.
* ``sd21gpu``: the same code at 512 px, 40 steps (10 guided), fp16 and bf16, batch 1, 4, 8:
  s/image per mode, guidance overhead, peak VRAM, images/s per GPU (the README's sizing table).

Variants (:data:`VARIANT_SPECS`): ``full`` (decode x0_hat at full size for eq. 10, the default),
``clfsize`` (``GuidedSampler(adv_decode="classifier")``: decode a latent shrunk to the classifier's
input), ``clfsize_cond`` (the same with ``update_uncond=false``, eq. 11 as the paper's text: only
c moves, so backward runs through the conditional rows alone, half the CFG batch; the default,
the released code's, also moves the unconditional embedding and so backpropagates through every
row), ``contrastive`` and ``contrastive_cond`` (``adv_prob`` 0, the API's default: L_contra alone, no
decode) and, when asked for, ``channels_last`` (UNet and VAE in channels-last memory). ``clfsize``
also reports how far its classifier probabilities and pixels are from the full decode's on the
same x0_hat. Each variant also gets ``step_loop_ratio``: the ratio its guided-step split implies
for the denoising loop alone, ``(S plain + G (guided - plain)) / (S plain)``; what the measured
ratio adds to it is image guidance's per-image work (the guide's VAE encode, the attention
recorder, the guide chain).
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


@dataclass(frozen=True)
class Variant:
    """One way to run the guided steps: eq. 10's decode, eq. 11's reading, adv_prob, memory format."""

    adv_decode: str = "full"  # GuidedSampler.adv_decode
    update_uncond: bool = True  # the default (released code); False: the paper's text
    adv_prob: float = ADV_PROB
    channels_last: bool = False

    @property
    def same_random(self) -> bool:
        """Its ``random`` runs are the same computation as every other such variant's."""
        return not self.channels_last


VARIANT_SPECS = {
    "full": Variant(),
    "clfsize": Variant(adv_decode="classifier"),
    "clfsize_cond": Variant(adv_decode="classifier", update_uncond=False),
    "contrastive": Variant(adv_prob=0.0),
    "contrastive_cond": Variant(adv_prob=0.0, update_uncond=False),
    "channels_last": Variant(channels_last=True),
}
VARIANTS = ("full", "clfsize", "clfsize_cond", "contrastive", "contrastive_cond")  # channels_last: ask
GPU_VARIANTS = ("full", "clfsize", "clfsize_cond", "contrastive")


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


def _options(mode: str, setup: Setup, native: int, variant: Variant = VARIANT_SPECS["full"]) -> Any:
    """The job options of one run; the size only when it is not the model's own (>= 64 px)."""
    from actgen_shared.schemas import GenerationOptions

    size = None if setup.size == native else setup.size
    return GenerationOptions(
        mode=mode,
        num_inference_steps=setup.steps,
        grad_steps=setup.grad_steps,
        adv_prob=variant.adv_prob if mode == "actgen" else 0.0,
        update_uncond=variant.update_uncond,
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
    pred = sampler.predict_noise(
        x, t, uncond, cond, weights, plan.rows, sampler.resolve(options).update_uncond
    )
    x0 = post.predict_x0(x, cfg_noise(pred.uncond, pred.cond, sampler.resolve(options).guidance_scale))
    x0_rows = x0[plan.rows]
    now = mark("unet_forward", start)
    x0_leaf = x0_rows.detach().requires_grad_(True)
    targets = plan.targets(x0)
    contra = contrastive_loss(x0_leaf, targets.bank, targets.valid, targets.margin)
    adv_rows = targets.adv_rows
    if adv_rows.numel():  # eq. 10's decode and classifier, for the adversarial items only
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
    else:  # L_contra alone (adv_prob 0)
        marks.update(decode_forward=0.0, classifier_forward=0.0, classifier_backward=0.0)
        (g_x0,) = torch.autograd.grad(contra.sum(), x0_leaf)
        now = mark("decode_backward", now)  # the contrastive loss's own backward
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
    ``split``, a guided step's parts at the largest batch and ``step_loop_ratio``. ``sampler``: the
    model's existing one.
    """
    from actgen_generator.sampler import GuidedSampler, with_banks

    unknown = [v for v in variants if v not in VARIANT_SPECS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; use some of {list(VARIANT_SPECS)}")
    specs = {name: VARIANT_SPECS[name] for name in variants}
    device = model.device
    classifier = _classifier(model, setup.size)
    banks = _banks(_latent_shape(model, setup.size), device)
    if sampler is None:  # one per UNet: each installs its own attention recorder on it
        sampler = GuidedSampler(model)
    times: dict[tuple[str, str, int], list[float]] = {}
    peaks: dict[tuple[str, str, int], float] = {}

    def use(variant: Variant) -> None:
        sampler.adv_decode = variant.adv_decode
        memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
        model.pipe.unet.to(memory_format=memory_format)
        model.pipe.vae.to(memory_format=memory_format)

    def run(name: str, mode: str, batch: int, also: tuple[str, ...] = ()) -> float:
        """Seconds per image of one run, its peak memory noted for ``name`` and the ``also`` variants."""
        use(specs[name])
        items = with_banks(guide_items(batch, 32), banks, group="bench")
        with peak_memory(device) as peak:
            _sync(device)
            start = time.perf_counter()
            sampler(items, _options(mode, setup, model.native_size, specs[name]), classifier=classifier)
            _sync(device)
            elapsed = time.perf_counter() - start
        for variant in (name, *also):
            key = (variant, mode, batch)
            peaks[key] = max(peaks.get(key, 0.0), peak["peak_mb"])
        return elapsed / batch

    # `random` is the same computation under every variant but channels_last (they differ on
    # guided steps only): it runs once per round for all of them, and its fastest run is their one
    # baseline, so noise cannot flatter a variant
    shared = [v for v in variants if specs[v].same_random]
    run(variants[0], "actgen", setup.batches[0])  # warm-up: first-call allocations and kernels
    for _ in range(setup.repeats):
        for batch in setup.batches:
            if shared:
                elapsed = run(shared[0], "random", batch, also=tuple(shared[1:]))
                for v in shared:
                    times.setdefault((v, "random", batch), []).append(elapsed)
            for variant in variants:
                modes = ("actgen",) if variant in shared else ("random", "actgen")
                for mode in modes:
                    times.setdefault((variant, mode, batch), []).append(run(variant, mode, batch))
    use(Variant())
    top = max(setup.batches)
    out: dict[str, Any] = {
        "model": model.model_id,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "size_px": setup.size,
        "batches": list(setup.batches),
        "steps": setup.steps,
        "grad_steps": setup.grad_steps,
        "bank_per_class": BANK_PER_CLASS,
        "classifier_input_px": classifier.input_size,
        "repeats": setup.repeats,
        "threads": torch.get_num_threads(),
        "memory": "peak VRAM allocated" if device.type == "cuda" else "peak RSS",
        "variants": {},
    }
    for variant in variants:
        spi = {f"{m}_b{b}": min(times[(variant, m, b)]) for m in ("random", "actgen") for b in setup.batches}
        out["variants"][variant] = {
            "adv_decode": specs[variant].adv_decode,
            "update_uncond": specs[variant].update_uncond,
            "adv_prob": specs[variant].adv_prob,
            "seconds_per_image": spi,
            "seconds_per_image_median": {
                f"{m}_b{b}": statistics.median(times[(variant, m, b)])
                for m in ("random", "actgen")
                for b in setup.batches
            },
            "guidance_overhead_ratio": spi[f"actgen_b{top}"] / spi[f"random_b{top}"],
            "images_per_second": {f"b{b}": 1.0 / spi[f"actgen_b{b}"] for b in setup.batches},
            "peak_memory_mb": {f"{m}_b{b}": mb for (v, m, b), mb in peaks.items() if v == variant},
        }
    if split:
        items = with_banks(guide_items(top, 32), banks, group="bench")
        out["plain_step_s"] = min(
            plain_step_seconds(sampler, items, _options("actgen", setup, model.native_size)) for _ in range(2)
        )
        out["guided_step_s"] = {}
        for name in variants:
            use(specs[name])
            opts = _options("actgen", setup, model.native_size, specs[name])
            parts = [guided_step_split(sampler, items, opts, classifier) for _ in range(2)]
            best = {k: min(p[k] for p in parts) for k in parts[0] if k != "guided_step"}
            out["guided_step_s"][name] = {**best, "guided_step": sum(best.values())}  # fastest of each part
            out["variants"][name]["step_loop_ratio"] = step_loop_ratio(
                out["plain_step_s"], out["guided_step_s"][name]["guided_step"], setup.steps, setup.grad_steps
            )
        use(Variant())
        out["guided_rows"] = top
    return out


def step_loop_ratio(plain_s: float, guided_s: float, steps: int, grad_steps: int) -> float:
    """actgen / random of the denoising loop alone, from one plain and one guided step's seconds."""
    return (steps * plain_s + grad_steps * (guided_s - plain_s)) / (steps * plain_s)


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
        out["dtypes"][dtype] = bench_model(model, setup, GPU_VARIANTS)
        out["dtypes"][dtype]["clfsize_vs_full"] = decode_agreement(model, GPU_SIZE)
        del model
        torch.cuda.empty_cache()
    return out


def table(name: str, r: dict[str, Any]) -> str:
    """Printable lines for one result of :func:`bench_model`."""
    lines = [
        f"{name}: {r['model']} on {r['device']} ({r['dtype']}, {r['size_px']} px, {r['steps']} steps, "
        f"{r['grad_steps']} guided, classifier {r['classifier_input_px']} px, "
        f"{r['threads']} threads, best of {r['repeats']})"
    ]
    head = "".join(f"{f'{m} b{b}':>12}" for b in r["batches"] for m in ("random", "actgen"))
    lines.append(
        f"  {'variant':<17}{'decode':>11}{'uncond':>7}{'adv':>5}{head}{'ratio':>7}{'loop':>6}{'img/s':>7}"
        f"  {r['memory']} MiB (actgen)"
    )
    top = max(r["batches"])
    for variant, v in r["variants"].items():
        cells = "".join(
            f"{v['seconds_per_image'][f'{m}_b{b}']:>12.3f}"
            for b in r["batches"]
            for m in ("random", "actgen")
        )
        mem = v["peak_memory_mb"].get(f"actgen_b{top}", math.nan)
        loop = v.get("step_loop_ratio", math.nan)
        lines.append(
            f"  {variant:<17}{v['adv_decode']:>11}{'moves' if v['update_uncond'] else 'fixed':>7}"
            f"{v['adv_prob']:>5.1f}{cells}{v['guidance_overhead_ratio']:>7.2f}{loop:>6.2f}"
            f"{v['images_per_second'][f'b{top}']:>7.2f}  {mem:.0f}"
        )
    lines.append(
        "  ratio: actgen / random measured; loop: what the guided-step split implies for the denoising"
        " loop alone"
    )
    if "plain_step_s" in r:
        lines.append(f"  plain step (the whole CFG batch, no graph) {r['plain_step_s']:.3f}s")
    for variant, parts in r.get("guided_step_s", {}).items():
        lines.append(
            f"  guided step ({variant}, {r['guided_rows']} rows): "
            + ", ".join(f"{k} {s:.3f}s" for k, s in parts.items())
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
