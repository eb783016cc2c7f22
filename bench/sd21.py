"""Guidance overhead where the UNet dominates: SD 2.1's architecture, random weights (issues 12 and 26).

* ``sd21cpu``: SD 2.1 base's UNet/VAE/TAESD/text encoder (docs/architecture.md 9, built locally,
  nothing downloaded) at a size a 2-core CPU runs in minutes: 128 px, batch 2, 8 steps, gradient
  guidance on the first 2 (the paper's 10 of 40), every guided item adversarial against a
  classifier with the paper's input/output ratio (224 of 512 px -> 56 of 128), 2 rounds.
* ``sd21gpu``: the same code at 512 px, 40 steps (10 guided), fp16, adv_prob 0.5, batch 8 (5
  rounds) and 1 (3 rounds), gradient checkpointing off (set, not ``auto``); run it in a fresh
  process (``python -m bench.sd21 gpu``; ``make gpu-check`` does), performance first.

The protocol (docs/benchmarks.md): every (variant, batch) cell gets one untimed warm-up call,
reported as ``first_call_s`` (cuDNN autotuning, allocator growth, the first backward through each
shape); then rounds in which every cell of the batch runs once, in an order rotated each round;
each cell's seconds per image as median and min-max over rounds, and each ratio actgen / random
as the median of the per-round ratios (the two ran side by side). Inside every call the sampler's
own loop is timed in parts (``PartTimer``: CUDA events on a GPU, no sync in the loop), and the
parts are checked to add up to the call's wall time within 5 %. One more call per cell runs under
``torch.utils.flop_counter`` for its FLOPs: TFLOP/s, % of the GPU's dense peak, and each ratio's
FLOP floor (what the extra arithmetic alone would cost at the same efficiency). Peak memory
(allocated and reserved on a GPU, RSS on the CPU), versions and clocks are reported, and the
result is handed to ``on_cell`` after every round so the JSON on disk is never older than a round.

Variants (:data:`VARIANT_SPECS`): ``full`` (the ``released`` preset: the VAE decodes x0_hat for
eq. 10, eq. 11 moves [uncond, c] so its backward runs through the whole CFG batch), ``tiny``
(eq. 10 through the tiny decoder: TAESD's architecture), ``cond`` (eq. 11's backward through the
conditional rows only), ``fast`` (both: the ``fast`` preset), ``clfsize``/``clfsize_cond``
(``GuidedSampler(adv_decode="classifier")``: the VAE decodes a latent shrunk to the classifier's
input), ``contrastive``/``contrastive_cond`` (adv_prob 0: L_contra alone) and ``channels_last``.
The guided step's split (:func:`guided_step_split`) gives each part of one guided step, the tiny
decoder's share among them, and ``step_loop_ratio``, the ratio the split implies for the loop.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bench.run import guide_items

CPU_SIZE, CPU_BATCH, CPU_STEPS, CPU_GRAD_STEPS, CPU_ROUNDS = 128, 2, 8, 2, 2
GPU_SIZE, GPU_STEPS, GPU_GRAD_STEPS = 512, 40, 10
GPU_ROUNDS = {8: 5, 1: 3}  # batch -> interleaved rounds
GPU_DTYPE = "float16"
GPU_BUDGET_S = 390.0  # the section stops starting rounds past this (gpu-check's call is <= 7 min)
CLASSIFIER_FRACTION = 224 / 512  # the paper's classifier input over its generation size
ADV_PROB = 1.0  # CPU: every guided item decodes and classifies, the overhead's upper end
GPU_ADV_PROB = 0.5  # GPU: the targets (fast <= 1.3, released <= 1.8) are stated at 0.5
TARGET_SD21 = 1.2
BANK_PER_CLASS = 16
PART_TOLERANCE = 0.05  # the parts must add up to the call within 5 %
# dense fp16/bf16 tensor peak, TFLOP/s (vendor data sheets, without sparsity); first match wins
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("4090", 165.2),
)


@dataclass(frozen=True)
class Variant:
    """One way to run the guided steps: eq. 10's decode and decoder, eq. 11's rows, adv_prob, layout."""

    adv_decode: str = "full"  # GuidedSampler.adv_decode
    update_uncond: bool = True  # the default (released code); False: backward through c's rows only
    adv_prob: float | None = None  # None: the setup's
    adv_decoder: str = "vae"  # options.adv_decoder
    channels_last: bool = False

    @property
    def same_random(self) -> bool:
        """Its ``random`` runs are the same computation as every other such variant's."""
        return not self.channels_last


VARIANT_SPECS = {
    "full": Variant(),
    "tiny": Variant(adv_decoder="tiny"),
    "cond": Variant(update_uncond=False),
    "fast": Variant(adv_decoder="tiny", update_uncond=False),
    "clfsize": Variant(adv_decode="classifier"),
    "clfsize_cond": Variant(adv_decode="classifier", update_uncond=False),
    "contrastive": Variant(adv_prob=0.0),
    "contrastive_cond": Variant(adv_prob=0.0, update_uncond=False),
    "channels_last": Variant(channels_last=True),
}
VARIANTS = ("full", "fast")  # the CPU section's: released and fast (tiny and cond: ask)
GPU_VARIANTS = ("full", "fast", "tiny", "cond")


@dataclass
class Setup:
    """One measurement's sizes and protocol."""

    size: int
    batches: tuple[int, ...]
    steps: int
    grad_steps: int
    rounds: int | dict[int, int]  # per batch when a dict
    adv_prob: float = ADV_PROB
    budget_s: float = math.inf  # no round starts past this many seconds
    grad_checkpointing: str = "off"
    count_flops: bool = True  # one more call per cell under the FLOP counter (off: no floor, no TFLOP/s)

    def rounds_for(self, batch: int) -> int:
        return self.rounds.get(batch, 1) if isinstance(self.rounds, dict) else int(self.rounds)


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
        out["reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
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
    adv_prob = setup.adv_prob if variant.adv_prob is None else variant.adv_prob
    return GenerationOptions(
        mode=mode,
        num_inference_steps=setup.steps,
        grad_steps=setup.grad_steps,
        adv_prob=adv_prob if mode == "actgen" else 0.0,
        update_uncond=variant.update_uncond,
        adv_decoder=variant.adv_decoder,  # type: ignore[arg-type]
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
        decoder = sampler.resolve(options).adv_decoder
        decoded = sampler.adv_decode_image(x0_leaf[adv_rows], classifier.input_size, decoder)
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


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of everything ``fn`` runs, backward included (torch.utils.flop_counter: matmuls,
    convolutions, attention; elementwise work is not counted, so the figure is a floor)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def gpu_peak_tflops(name: str) -> float | None:
    """The dense fp16 tensor peak of a GPU by its name, None when it is not in the table."""
    for key, peak in GPU_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


@dataclass
class _Cell:
    """One (variant, batch) of the protocol: its calls' seconds per image and what came with them."""

    variant: str
    mode: str
    batch: int
    first_call_s: float = math.nan
    seconds: list[float] = field(default_factory=list)  # per image, one per round
    parts: list[dict[str, float]] = field(default_factory=list)  # per image, one per round
    coverage: list[float] = field(default_factory=list)  # parts' sum / the call's wall time
    peak: dict[str, float] = field(default_factory=dict)
    flops_per_image: float = math.nan
    adversarial: int = 0

    @property
    def key(self) -> str:
        return f"{self.mode}_b{self.batch}"

    def summary(self, peak_tflops: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"first_call_s": self.first_call_s, "rounds": len(self.seconds)}
        if self.seconds:
            median = statistics.median(self.seconds)
            out.update(
                seconds_per_image=median,
                min=min(self.seconds),
                max=max(self.seconds),
                per_round=self.seconds,
                parts_per_image={
                    k: statistics.median(p.get(k, 0.0) for p in self.parts) for k in self.parts[0]
                },
                parts_cover=statistics.median(self.coverage),
                parts_add_up=all(abs(1 - c) <= PART_TOLERANCE for c in self.coverage),
            )
            if math.isfinite(self.flops_per_image):
                tflops = self.flops_per_image / median / 1e12
                out.update(tflop_per_image=self.flops_per_image / 1e12, tflops=tflops)
                if peak_tflops:
                    out["percent_of_peak"] = 100.0 * tflops / peak_tflops
        out.update({f"{k}": v for k, v in self.peak.items()})
        if self.mode == "actgen":
            out["adversarial_items"] = self.adversarial
        return out


def bench_model(
    model: Any,
    setup: Setup,
    variants: tuple[str, ...] = ("full",),
    split: bool = True,
    sampler: Any = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The protocol of the module docstring for ``random`` and each variant's ``actgen`` per batch.

    Returns per variant: ``cells`` (per ``mode_bB``: median, min, max, first call, parts, FLOPs,
    memory), ``ratio`` per batch (median of per-round actgen / random, with min-max and the FLOP
    floor), and with ``split`` a guided step's parts and ``step_loop_ratio``. ``sampler``: the
    model's existing one (its checkpointing policy is set to the setup's for the run).
    """
    from actgen_generator.part_timer import PartTimer
    from actgen_generator.sampler import GuidedSampler, with_banks

    unknown = [v for v in variants if v not in VARIANT_SPECS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; use some of {list(VARIANT_SPECS)}")
    specs = {name: VARIANT_SPECS[name] for name in variants}
    device = model.device
    classifier = _classifier(model, setup.size)
    banks = _banks(_latent_shape(model, setup.size), device)
    if sampler is None:  # one per UNet: each installs its own attention recorder on it
        sampler = GuidedSampler(model, grad_checkpointing=setup.grad_checkpointing)  # type: ignore[arg-type]
    policy_before = sampler.grad_checkpointing
    sampler.grad_checkpointing = setup.grad_checkpointing
    timer = PartTimer(device)
    sampler.timer = timer
    peak_tflops = gpu_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    started = time.perf_counter()

    def use(variant: Variant) -> None:
        sampler.adv_decode = variant.adv_decode
        memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
        model.pipe.unet.to(memory_format=memory_format)
        model.pipe.vae.to(memory_format=memory_format)

    def call(cell: _Cell) -> tuple[float, dict[str, float], dict[str, float], list[Any]]:
        """One timed call: seconds per image, its parts per image, peak memory, the outputs."""
        use(specs.get(cell.variant, Variant()))
        items = with_banks(guide_items(cell.batch, 32), banks, group="bench")
        opts = _options(cell.mode, setup, model.native_size, specs.get(cell.variant, Variant()))
        timer.reset()
        with peak_memory(device) as peak:
            _sync(device)
            t0 = time.perf_counter()
            outputs = sampler(items, opts, classifier=classifier)
            _sync(device)
            elapsed = time.perf_counter() - t0
        parts = timer.finish()
        return elapsed / cell.batch, {k: v / cell.batch for k, v in parts.items()}, peak, outputs

    out: dict[str, Any] = {
        "model": model.model_id,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "size_px": setup.size,
        "batches": list(setup.batches),
        "rounds": {f"b{b}": setup.rounds_for(b) for b in setup.batches},
        "steps": setup.steps,
        "grad_steps": setup.grad_steps,
        "adv_prob": setup.adv_prob,
        "grad_checkpointing": setup.grad_checkpointing,
        "bank_per_class": BANK_PER_CLASS,
        "classifier_input_px": classifier.input_size,
        "threads": torch.get_num_threads(),
        "memory": "peak VRAM allocated / reserved" if device.type == "cuda" else "peak RSS",
        "peak_tflops": peak_tflops,
        "variants": {},
        "cut": False,
    }
    cells: dict[tuple[str, int], _Cell] = {}
    try:
        for batch in setup.batches:
            row = [_Cell("random", "random", batch)] + [_Cell(v, "actgen", batch) for v in variants]
            for cell in row:  # warm-up: every cell once, untimed in the figures; then its FLOPs
                cell.first_call_s, _, _, outputs = call(cell)
                cell.first_call_s *= batch
                cell.adversarial = sum(bool(o.record.adversarial) for o in outputs)
                cells[(cell.variant, batch)] = cell
                if setup.count_flops:
                    cell.flops_per_image = count_flops(lambda c=cell: call(c)) / batch
            for r in range(setup.rounds_for(batch)):
                if time.perf_counter() - started > setup.budget_s:
                    out["cut"] = True
                    break
                for cell in row[r % len(row) :] + row[: r % len(row)]:  # rotated each round
                    seconds, parts, peak, _ = call(cell)
                    cell.seconds.append(seconds)
                    cell.parts.append(parts)
                    cell.coverage.append(sum(parts.values()) / seconds)
                    for k, v in peak.items():
                        cell.peak[k] = max(cell.peak.get(k, 0.0), v)
                _summarise(out, cells, variants, specs, peak_tflops)
                if on_cell is not None:
                    on_cell(out)
        if split:
            _split(out, model, sampler, setup, variants, specs, banks, classifier, use)
    finally:
        sampler.timer = None
        sampler.grad_checkpointing = policy_before
        use(Variant())
    out["section_s"] = time.perf_counter() - started
    _summarise(out, cells, variants, specs, peak_tflops)
    return out


def _summarise(
    out: dict[str, Any],
    cells: dict[tuple[str, int], _Cell],
    variants: tuple[str, ...],
    specs: dict[str, Variant],
    peak_tflops: float | None,
) -> None:
    """Per variant: its cells and random's, and per batch the median of per-round ratios with the floor."""
    for variant in variants:
        entry = out["variants"].setdefault(variant, {})
        spec = specs[variant]
        entry.update(
            adv_decode=spec.adv_decode,
            adv_decoder=spec.adv_decoder,
            update_uncond=spec.update_uncond,
            adv_prob=out["adv_prob"] if spec.adv_prob is None else spec.adv_prob,
        )
        entry["cells"], entry["ratio"] = {}, {}
        for (name, batch), cell in cells.items():
            if name not in (variant, "random"):
                continue
            entry["cells"][cell.key] = cell.summary(peak_tflops)
            if name != variant:
                continue
            base = cells[("random", batch)]
            rounds = min(len(cell.seconds), len(base.seconds))
            if not rounds:
                continue
            per_round = [cell.seconds[i] / base.seconds[i] for i in range(rounds)]
            entry["ratio"][f"b{batch}"] = {
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
                "flop_floor": cell.flops_per_image / base.flops_per_image,  # nan without the count
            }


def _split(
    out: dict[str, Any],
    model: Any,
    sampler: Any,
    setup: Setup,
    variants: tuple[str, ...],
    specs: dict[str, Variant],
    banks: dict[int, torch.Tensor],
    classifier: Any,
    use: Callable[[Variant], None],
) -> None:
    """A guided step's parts at the largest batch (every item adversarial), fastest of 2 per part."""
    from actgen_generator.sampler import with_banks

    top = max(setup.batches)
    items = with_banks(guide_items(top, 32), banks, group="bench")
    all_adv = Setup(setup.size, setup.batches, setup.steps, setup.grad_steps, 1, adv_prob=1.0)
    out["plain_step_s"] = min(
        plain_step_seconds(sampler, items, _options("actgen", all_adv, model.native_size)) for _ in range(2)
    )
    out["guided_step_s"] = {}
    for name in variants:
        use(specs[name])
        opts = _options("actgen", all_adv, model.native_size, specs[name])
        parts = [guided_step_split(sampler, items, opts, classifier) for _ in range(2)]
        best = {k: min(p[k] for p in parts) for k in parts[0] if k != "guided_step"}
        step = sum(best.values())
        out["guided_step_s"][name] = {**best, "guided_step": step}  # fastest of each part
        entry = out["variants"].setdefault(name, {})
        entry["step_loop_ratio"] = step_loop_ratio(out["plain_step_s"], step, setup.steps, setup.grad_steps)
        entry["decoder_share_of_guided_step"] = (best["decode_forward"] + best["decode_backward"]) / step
    use(Variant())
    out["guided_rows"] = top


def step_loop_ratio(plain_s: float, guided_s: float, steps: int, grad_steps: int) -> float:
    """actgen / random of the denoising loop alone, from one plain and one guided step's seconds."""
    return (steps * plain_s + grad_steps * (guided_s - plain_s)) / (steps * plain_s)


def versions(device: torch.device) -> dict[str, Any]:
    """Library versions, and on a GPU its model, memory, driver and clocks (nvidia-smi when present)."""
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("diffusers", "transformers", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            gpu=props.name,
            gpu_memory_gb=props.total_memory / 1e9,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        try:
            done = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            values = done.stdout.strip().splitlines()[0].split(", ") if done.returncode == 0 else []
            out["nvidia_smi"] = dict(zip(query.split(","), values, strict=False))
        except (OSError, subprocess.SubprocessError, IndexError):
            out["nvidia_smi"] = None
    return out


def run_cpu(
    rounds: int = CPU_ROUNDS,
    variants: tuple[str, ...] = VARIANTS,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The ``sd21cpu`` section: SD 2.1 architecture in float32 on the CPU at 128 px."""
    from actgen_generator.pipeline import sd21_architecture_pipeline

    started = time.perf_counter()
    model = sd21_architecture_pipeline("cpu", torch.float32)
    build_s = time.perf_counter() - started
    # no FLOP count on the CPU: one more call per cell, and no peak to compare with
    setup = Setup(CPU_SIZE, (CPU_BATCH,), CPU_STEPS, CPU_GRAD_STEPS, rounds, count_flops=False)
    out = bench_model(model, setup, variants, on_cell=on_cell)
    out.update(build_s=build_s, target=TARGET_SD21, model_rss_mb=_rss_mb(), versions=versions(model.device))
    return out


def run_gpu(
    rounds: dict[int, int] | None = None,
    variants: tuple[str, ...] = GPU_VARIANTS,
    budget_s: float = GPU_BUDGET_S,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The ``sd21gpu`` section: SD 2.1 architecture at 512 px on CUDA in fp16, batch 8 then 1."""
    from actgen_generator.pipeline import sd21_architecture_pipeline

    rounds = rounds or GPU_ROUNDS
    model = sd21_architecture_pipeline("cuda", GPU_DTYPE)
    setup = Setup(
        GPU_SIZE,
        tuple(rounds),
        GPU_STEPS,
        GPU_GRAD_STEPS,
        rounds,
        adv_prob=GPU_ADV_PROB,
        budget_s=budget_s,
    )
    head = {"gpu": torch.cuda.get_device_name(0), "versions": versions(model.device)}

    def report(partial: dict[str, Any]) -> None:
        if on_cell is not None:
            on_cell({**head, **partial})

    out = bench_model(model, setup, variants, on_cell=report)
    return {**head, **out, "targets": {"plain_percent_of_peak_b8": 45.0, "fast_b8": 1.3, "full_b8": 1.8}}


def table(name: str, r: dict[str, Any]) -> str:
    """Printable lines for one result of :func:`bench_model`."""
    lines = [
        f"{name}: {r['model']} on {r['device']} ({r['dtype']}, {r['size_px']} px, {r['steps']} steps, "
        f"{r['grad_steps']} guided, adv_prob {r['adv_prob']}, classifier {r['classifier_input_px']} px, "
        f"checkpointing {r['grad_checkpointing']}, {r['threads']} threads, rounds {r['rounds']}"
        + (", CUT by the time budget" if r.get("cut") else "")
        + ")"
    ]
    lines.append(
        f"  {'variant':<9}{'decoder':>8}{'uncond':>7}{'cell':>11}{'s/img':>9}{'min-max':>15}{'first':>8}"
        f"{'ratio':>7}{'min-max':>13}{'floor':>7}{'TFLOP/s':>9}{'%peak':>7}{'parts':>7}  {r['memory']} MiB"
    )
    for variant, v in r["variants"].items():
        for key, c in v.get("cells", {}).items():
            if "seconds_per_image" not in c:
                continue
            batch = key.split("_b")[-1]
            ratio = v["ratio"].get(f"b{batch}") if key.startswith("actgen") else None
            ratio_text = (
                f"{ratio['median']:>7.2f}{ratio['min']:>6.2f}-{ratio['max']:<6.2f}{ratio['flop_floor']:>7.2f}"
                if ratio
                else f"{'':>7}{'':>13}{'':>7}"
            )
            mem = "/".join(f"{c[k]:.0f}" for k in ("peak_mb", "reserved_mb") if k in c)
            lines.append(
                f"  {variant:<9}{v['adv_decoder']:>8}{'moves' if v['update_uncond'] else 'fixed':>7}{key:>11}"
                f"{c['seconds_per_image']:>9.3f}{c['min']:>7.3f}-{c['max']:<7.3f}{c['first_call_s']:>8.2f}"
                f"{ratio_text}{c.get('tflops', math.nan):>9.2f}{c.get('percent_of_peak', math.nan):>7.1f}"
                f"{c['parts_cover']:>7.2f}  {mem}"
            )
    lines.append(
        "  ratio: median of per-round actgen / random (min-max); floor: the same in FLOPs; first: the "
        "warm-up call's seconds; parts: the sampler's timed parts over the call's wall time"
    )
    if "plain_step_s" in r:
        lines.append(f"  plain step (the whole CFG batch, no graph) {r['plain_step_s']:.3f}s")
    for variant, parts in r.get("guided_step_s", {}).items():
        share = r["variants"][variant].get("decoder_share_of_guided_step", math.nan)
        lines.append(
            f"  guided step ({variant}, {r['guided_rows']} rows, decoder share {share:.1%}): "
            + ", ".join(f"{k} {s:.3f}s" for k, s in parts.items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.sd21 gpu|cpu --out FILE``: one section in this (fresh) process, the JSON
    rewritten after every round (what ``make gpu-check`` runs first)."""
    import argparse
    import json
    import os
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("section", choices=("gpu", "cpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=GPU_BUDGET_S)
    args = parser.parse_args(argv)

    def save(partial: dict[str, Any]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(partial, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, args.out)

    if args.section == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("bench.sd21 gpu: no CUDA device")
        result = run_gpu(budget_s=args.budget_s, on_cell=save)
        save(result)
        print(table(f"SD 2.1 architecture, {result['gpu']}, {GPU_DTYPE}", result), flush=True)
    else:
        result = run_cpu(on_cell=save)
        save(result)
        print(table("SD 2.1 architecture, CPU", result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
