"""Gradient checkpointing of eq. 11's backward: on only when a guided batch's graph would not fit.

diffusers checkpoints a block whenever autograd is recording and the block's flag is set (it
looks at ``torch.is_grad_enabled()``, not at training mode), so with the flag on every guided
UNet call runs its forward twice, about +30 % per guided step. ``auto`` turns it on for a batch
only when the graph that batch's gradient steps keep (the UNet's activations for the guided
rows, the VAE decode's for the adversarial ones) is estimated to exceed what the device has
free; on the CPU never (``docs/architecture.md`` 5, step 6).

The estimate counts activations per channel and pixel of each block, measured on diffusers'
blocks with ``torch.autograd.graph.saved_tensors_hooks`` (weights excluded): a ResNet block keeps
about 10, a transformer block (self-attention by SDPA, cross-attention, GEGLU feed-forward) about
20, and a VAE decoder ResNet about 8. For SD 2.1 at 512 px in float16 that is about 0.7 GB per
guided UNet row and 3 GB per adversarial row decoded at full size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

Policy = Literal["auto", "on", "off"]
POLICIES: tuple[Policy, ...] = ("auto", "on", "off")
RESNET_SAVED = 10  # activation elements a UNet ResNet block keeps, per channel and pixel
TRANSFORMER_SAVED = 20  # the same for one transformer block (attention, cross-attention, feed-forward)
VAE_RESNET_SAVED = 8  # the same for a VAE decoder ResNet (with its upsampler and mid attention)
GRAPH_MARGIN = 1.25  # the backward's own gradient buffers on top of the saved activations
FREE_SHARE = 0.8  # share of the free device memory the graph may fill before checkpointing turns on


def _per_block(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _pixels(latent_hw: tuple[int, int], level: int) -> int:
    return math.ceil(latent_hw[0] / 2**level) * math.ceil(latent_hw[1] / 2**level)


def unet_graph_elements(config: Mapping[str, Any], latent_hw: tuple[int, int]) -> int:
    """Activation elements one UNet row keeps for backward at this latent size (estimate)."""
    channels = list(config["block_out_channels"])
    n = len(channels)
    layers = _per_block(config["layers_per_block"], n)
    depth = _per_block(config.get("transformer_layers_per_block", 1) or 1, n)
    total = 0
    for level, kind in enumerate(config["down_block_types"]):
        attn = depth[level] * TRANSFORMER_SAVED if "CrossAttn" in kind else 0
        total += _pixels(latent_hw, level) * channels[level] * layers[level] * (RESNET_SAVED + attn)
    for j, kind in enumerate(config["up_block_types"]):
        level = n - 1 - j
        attn = depth[level] * TRANSFORMER_SAVED if "CrossAttn" in kind else 0
        total += _pixels(latent_hw, level) * channels[level] * (layers[level] + 1) * (RESNET_SAVED + attn)
    mid = 2 * RESNET_SAVED + depth[-1] * TRANSFORMER_SAVED  # mid block: two ResNets around a transformer
    return total + _pixels(latent_hw, n - 1) * channels[-1] * mid


def vae_decode_graph_elements(config: Mapping[str, Any], latent_hw: tuple[int, int]) -> int:
    """Activation elements one VAE decode keeps for backward from a latent of this size (estimate)."""
    channels = list(reversed(config["block_out_channels"]))
    layers = int(config["layers_per_block"]) + 1
    h, w = latent_hw
    total = h * w * channels[0] * 2  # mid block
    for j, c in enumerate(channels):
        total += (h * 2**j) * (w * 2**j) * c * layers
    return total * VAE_RESNET_SAVED


def free_bytes(device: torch.device) -> int:
    """Device memory a new graph can use: free on the device plus what torch has cached unused."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def wants_checkpointing(policy: Policy, device: torch.device, graph_bytes: int) -> bool:
    """``on``/``off`` as said; ``auto``: on a GPU whose free memory is short for ``graph_bytes``."""
    if policy != "auto":
        return policy == "on"
    if device.type != "cuda":
        return False
    return graph_bytes * GRAPH_MARGIN > FREE_SHARE * free_bytes(device)


def set_checkpointing(models: Iterable[Any], on: bool) -> None:
    """Switch diffusers' gradient checkpointing of these models (UNet, VAE) on or off."""
    for model in models:
        if bool(model.is_gradient_checkpointing) == on:
            continue
        if on:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()


__all__ = [
    "POLICIES",
    "Policy",
    "free_bytes",
    "set_checkpointing",
    "unet_graph_elements",
    "vae_decode_graph_elements",
    "wants_checkpointing",
]
