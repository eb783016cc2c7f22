"""Load the diffusion pipeline a generator replica holds: a hub id, a local folder, one checkpoint
file, or the tiny model (:mod:`actgen_generator.model_source` tells which).

Folders go through ``StableDiffusionPipeline.from_pretrained`` (safetensors only, the fp16 variant
when the folder has one); a hub id is first fetched into the Hugging Face cache (only the files a
pipeline needs, :mod:`actgen_generator.model_fetch`), the tiny model first built once into a cache
folder, and a single file goes through ``from_single_file`` with SD 2.1 base's shipped configs.
Nothing is downloaded unless a hub id is named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from actgen_generator.devices import enable_fast_cuda_math, resolve_device
from actgen_generator.diffusers_classes import (
    AutoencoderKL,
    AutoencoderTiny,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from actgen_generator.model_source import SD21_BASE, SourceKind, resolve_model_source
from actgen_generator.tiny_model import (
    SD21_SCHEDULER,
    TINY_MODEL_VERSION,
    build_tiny_model,
    build_tokenizer,
    tiny_fingerprint,
)
from actgen_shared.presets import ModelDefaults, read_model_defaults

CACHE_ENV = "ACTGEN_CACHE_DIR"
# A model folder's surrogate decoder for eq. 10 (an AutoencoderTiny folder: config.json and
# safetensors weights; distilled by `actgen-lab distil-tiny-decoder` for the tiny models,
# TAESD for SD 2.1, put there by fetch-model). Found relative to the model folder wherever it lives.
TINY_VAE_DIR = "tiny_vae"
TINY_MODEL_ID = f"actgen/{TINY_MODEL_VERSION}"
FP16_VARIANT = "fp16"
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
    tiny_vae: AutoencoderTiny | None = None  # eq. 10's surrogate decoder (adv_decoder "tiny"), if any


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


def load_tiny_vae(folder: Path | None, dtype: torch.dtype) -> AutoencoderTiny | None:
    """The AutoencoderTiny in ``folder`` (safetensors only), None when there is none."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    return AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)


def _finish(
    pipe: StableDiffusionPipeline,
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    tiny_vae: AutoencoderTiny | None = None,
) -> LoadedModel:
    pipe = pipe.to(device)
    if device.type == "cuda":
        enable_fast_cuda_math()  # TF32 and cuDNN autotuning (devices.py)
    modules: list[torch.nn.Module] = [pipe.unet, pipe.vae, pipe.text_encoder]
    if tiny_vae is not None:
        tiny: torch.nn.Module = tiny_vae
        tiny.to(device=device, dtype=dtype)
        modules.append(tiny)
    for module in modules:
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe=pipe,
        model_id=model_id,
        device=device,
        dtype=dtype,
        native_size=_native_size(pipe),
        tiny_vae=tiny_vae,
    )


def fp16_variant(folder: Path) -> str | None:
    """The fp16 variant when some component of ``folder`` has fp16 weights (diffusers loads the plain
    weights of the others), else None: one download serves float16 on a GPU and float32 on the CPU."""
    found = any(folder.glob(f"*/*.{FP16_VARIANT}.safetensors")) or any(
        folder.glob(f"*/*.{FP16_VARIANT}-*.safetensors")
    )
    return FP16_VARIANT if found else None


def pipeline_from_folder(folder: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The pipeline of a diffusers folder, on the CPU: safetensors only, its fp16 variant when it has one."""
    return StableDiffusionPipeline.from_pretrained(
        str(folder),
        dtype=dtype,
        variant=fp16_variant(folder),
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )


def load_pipeline(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``model`` (hub id, local diffusers folder, checkpoint file; None: the tiny model) for sampling.

    ``revision`` applies to a hub id (default: the pinned one for SD 2.1 base, see model_source).
    The device defaults to CUDA when present, the dtype to float16 there and float32 on the CPU.
    """
    source = resolve_model_source(model, revision)  # a bad path fails here, before any weight is read
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source.kind is SourceKind.file:
        from actgen_generator.single_file import load_single_file  # its tokenizer data: only when used

        pipe = load_single_file(source.location, dt)
        # an SD 2.x checkpoint: TAESD when the Hugging Face cache holds it (fetch-model puts it there)
        from actgen_generator.model_fetch import cached_tiny_vae

        return _finish(pipe, str(model), dev, dt, load_tiny_vae(cached_tiny_vae(), dt))
    tiny_folder: Path | None
    if source.kind is SourceKind.tiny:
        folder, model_id = ensure_tiny_model(), TINY_MODEL_ID
        tiny_folder = folder / TINY_VAE_DIR
    elif source.kind is SourceKind.hub:
        from actgen_generator.model_fetch import download_pipeline, download_tiny_vae, in_sd_latent_space

        folder = download_pipeline(source.location, source.revision)
        model_id = f"{source.location}@{source.revision}" if source.revision else source.location
        tiny_folder = folder / TINY_VAE_DIR
        if not tiny_folder.is_dir() and in_sd_latent_space(folder):  # SD 2.1's: TAESD, like the model
            tiny_folder = download_tiny_vae()
    else:
        folder, model_id = Path(source.location), str(model)
        tiny_folder = folder / TINY_VAE_DIR
    loaded = _finish(pipeline_from_folder(folder, dt), model_id, dev, dt, load_tiny_vae(tiny_folder, dt))
    # values tuned on this model live in its folder; SD 2.1 has none: the released preset
    loaded.defaults = read_model_defaults(str(folder))
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
        tiny_vae = AutoencoderTiny()  # TAESD's architecture (madebyollin/taesd's config is the default)
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
    modules: tuple[torch.nn.Module, ...] = (unet, vae, text_encoder, tiny_vae)
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
    return _finish(pipe, f"{SD21_BASE} (architecture, random weights)", dev, dt, tiny_vae)
