"""``ACTGEN_COMPILE``: the replica's UNet and decoders through ``torch.compile``, warmed before ready.

``off`` (default): eager. ``default``: inductor's default mode. ``max-autotune``: inductor's
``max-autotune`` mode, which autotunes its kernels and on a GPU replays them as CUDA graphs.
Compilation is per input shape; a replica runs its batch at ``ACTGEN_MAX_BATCH`` and halves it on
out-of-memory (worker.py), so :func:`compile_and_warm` runs one short guided call at every size
of that ladder (max, max/2, ..., 1) before ``/readyz`` turns ready: no request pays a compile, and
after the second size dynamo marks the batch dimension dynamic instead of compiling each size
anew (its recompile limit is never reached). ``ACTGEN_CHANNELS_LAST`` puts the UNet and VAE in
channels-last memory (a GPU's tensor cores prefer it; on a CPU it was slower, docs/benchmarks.md).

The attention recorder's layers are compiled with the rest of the UNet: they write the class-token
map of the conditional rows into a tensor passed with the call (attention.ClassTokenRecord), never
into Python state, so a recording call is one graph without a break (docs/architecture.md 5, step 4).
``tests/test_compile.py`` counts the breaks and checks compiled and eager images agree on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from actgen_generator.sampler import GuidedSampler

CompileMode = Literal["off", "default", "max-autotune"]
COMPILE_MODES: tuple[CompileMode, ...] = ("off", "default", "max-autotune")


def batch_ladder(max_batch: int) -> list[int]:
    """The batch sizes a replica can run: ``max_batch`` halved down to 1 (worker.py's OOM ladder)."""
    sizes = [max(1, int(max_batch))]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


def compile_model(sampler: GuidedSampler, mode: CompileMode, channels_last: bool = False) -> None:
    """Compile the sampler's UNet, VAE and tiny decoder in place (``nn.Module.compile``); with
    ``channels_last`` put them in channels-last memory first."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {COMPILE_MODES}")
    # typed as nn.Module: diffusers' ModelMixin.to is wrapped (functools.wraps), which mypy reads as unbound
    modules: list[torch.nn.Module] = [
        m for m in (sampler.unet, sampler.vae, sampler.tiny_vae) if m is not None
    ]
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)
    if mode == "off":
        return
    options = {} if mode == "default" else {"mode": "max-autotune"}
    # the sampler calls the UNet itself but the autoencoders' decode()/encode(), which call their
    # decoder (and encoder) submodules: those are what gets compiled there
    targets = [sampler.unet, sampler.vae.decoder, sampler.vae.encoder]
    if sampler.tiny_vae is not None:
        targets.append(sampler.tiny_vae.decoder)
    for module in targets:
        module.compile(**options)


def warm_up(sampler: GuidedSampler, max_batch: int) -> list[int]:
    """One short actgen call per ladder size (a guided step with the decode's backward, then plain
    steps and the final decode): every graph a request can meet is compiled now. Returns the sizes."""
    from actgen_generator.contract import Classifier
    from actgen_generator.sampler import SampleItem, with_banks
    from actgen_shared.architectures import build_classifier
    from actgen_shared.schemas import GenerationOptions

    size = int(sampler.native_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build_classifier("simple_cnn", 2).eval().requires_grad_(False)
    classifier = Classifier(module, size, (0.5,) * 3, (0.5,) * 3)
    options = GenerationOptions(mode="actgen", num_inference_steps=2, grad_steps=1, adv_prob=1.0)
    guide = np.full((size, size, 3), 128, dtype=np.uint8)
    ladder = batch_ladder(max_batch)
    for batch in ladder:
        items = [SampleItem(guide=guide, class_id=0, class_name="cat", seed=k) for k in range(batch)]
        sampler(with_banks(items, {}, group="warm-up"), options, classifier=classifier)
    return ladder


def compile_and_warm(
    sampler: GuidedSampler, mode: CompileMode, channels_last: bool, max_batch: int
) -> list[int]:
    """:func:`compile_model`, then :func:`warm_up` when anything was compiled: the replica's start-up."""
    compile_model(sampler, mode, channels_last)
    return warm_up(sampler, max_batch) if mode != "off" else []


__all__ = ["COMPILE_MODES", "CompileMode", "batch_ladder", "compile_and_warm", "compile_model", "warm_up"]
