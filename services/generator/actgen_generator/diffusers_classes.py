"""The diffusers classes the tiny model and its trainer use, imported from their defining modules.

``from diffusers import AutoencoderKL`` gives the same class at run time, but diffusers' package
``__init__`` also names the dummy objects it falls back to without torch, and a type checker
takes those: every attribute (``.parameters``, ``.encode``, ``.save_pretrained``) is then
unknown. Importing from the defining modules gives mypy the real classes.
"""

from __future__ import annotations

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

__all__ = [
    "AutoencoderKL",
    "AutoencoderTiny",
    "DDPMScheduler",
    "StableDiffusionPipeline",
    "UNet2DConditionModel",
]
