"""Load the diffusion pipeline a generator replica holds: SD 2.1, a local folder, or the tiny model.

All three go through ``StableDiffusionPipeline.from_pretrained``; the tiny model is first built
once into a cache folder. Nothing is downloaded unless a hub id is named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from actgen_generator.devices import resolve_device
from actgen_generator.diffusers_classes import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from actgen_generator.tiny_model import (
    SD21_SCHEDULER,
    TINY_MODEL_VERSION,
    build_tiny_model,
    build_tokenizer,
    tiny_fingerprint,
)
from actgen_shared.presets import ModelDefaults, read_model_defaults

CACHE_ENV = "ACTGEN_CACHE_DIR"
TINY_MODEL_ID = f"actgen/{TINY_MODEL_VERSION}"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass
class LoadedModel:
    """A pipeline on its device, with what the service reports about it."""

    pipe: StableDiffusionPipeline
    model_id: str
    device: torch.device
    dtype: torch.dtype
    native_size: int  # px: unet sample size times the VAE's scale factor
    defaults: ModelDefaults | None = None  # its folder's actgen_defaults.json (actgen_shared.presets)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float16 on a GPU, float32 on the CPU."""
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or auto") from None


def tiny_model_dir() -> Path:
    """Where the tiny model is cached: ``$ACTGEN_CACHE_DIR`` or ``~/.cache/actgen/tiny-v1``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "actgen" / TINY_MODEL_VERSION


def ensure_tiny_model(path: Path | None = None) -> Path:
    """Build the tiny model into ``path`` unless a complete copy of the current builder's is there.

    A copy written by an older builder (another fingerprint) is rebuilt, so a cache kept across
    upgrades never serves stale weights.
    """
    path = path or tiny_model_dir()
    try:
        cached = json.loads((path / "actgen_tiny.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        cached = None
    if not (path / "model_index.json").is_file() or cached != tiny_fingerprint():
        build_tiny_model(path)
    return path


def _native_size(pipe: StableDiffusionPipeline) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _finish(
    pipe: StableDiffusionPipeline, model_id: str, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    pipe = pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe=pipe, model_id=model_id, device=device, dtype=dtype, native_size=_native_size(pipe)
    )


def load_pipeline(
    model: str | None = None, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """Load ``model`` (hub id or local diffusers folder; None: the tiny model) for sampling.

    The device defaults to CUDA when present, the dtype to float16 there and float32 on the CPU.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model in (None, ""):
        source, model_id = str(ensure_tiny_model()), TINY_MODEL_ID
    else:
        source, model_id = model, model
        local = Path(model).expanduser()
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise ValueError(f"model folder {model!r} has no model_index.json (not a diffusers pipeline)")
            source = str(local)
    pipe = StableDiffusionPipeline.from_pretrained(
        source, dtype=dt, safety_checker=None, requires_safety_checker=False
    )
    loaded = _finish(pipe, model_id, dev, dt)
    # values tuned on this model live in its folder; a hub id (SD 2.1) has none: the released preset
    loaded.defaults = read_model_defaults(source) if Path(source).is_dir() else None
    return loaded


def sd21_architecture_pipeline(device: str | torch.device, dtype: str | torch.dtype) -> LoadedModel:
    """SD 2.1 base's architecture with random weights (docs/architecture.md 9): the compute of the real model.

    For timing and memory on a GPU without downloading 5 GB; the tokenizer is the tiny one (only
    token ids reach the text encoder, and its vocabulary is a subset of SD's id range).
    """
    dev = torch.device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(dev):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # typed as nn.Module: diffusers' ModelMixin.to is wrapped (functools.wraps), which mypy reads as unbound
    modules: tuple[torch.nn.Module, ...] = (unet, vae, text_encoder)
    for module in modules:
        module.to(dtype=dt)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SD21_SCHEDULER),
        safety_checker=None,  # type: ignore[arg-type]  # diffusers accepts None; its hint says otherwise
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    return _finish(pipe, f"{SD21_BASE} (architecture, random weights)", dev, dt)
