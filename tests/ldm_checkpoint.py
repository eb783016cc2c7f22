"""Write a diffusers SD pipeline as one checkpoint in the original LDM layout, as SD 2.1's single files are.

The inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``), for the
tests: UNet under ``model.diffusion_model.``, VAE under ``first_stage_model.`` (its attention as
1x1 convolutions), the text encoder in OpenCLIP's layout under ``cond_stage_model.model.`` (q, k
and v stacked into ``in_proj``), which is how SD 2.x files hold them. A file written here and loaded
back by ``from_single_file`` must give every tensor its old value.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{UNET_RESNET.get(head, head)}.{tail}"


def _unet_key(key: str, config: Any) -> str:
    per_level = config.layers_per_block + 1
    parts = key.split(".")
    for ours, theirs in UNET_TOP.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    if parts[0] == "down_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":  # rest: conv.weight
            return f"input_blocks.{per_level * (level + 1)}.0.op.{rest.removeprefix('conv.')}"
        block = per_level * level + index + 1
        return (
            f"input_blocks.{block}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"input_blocks.{block}.1.{rest}"
        )
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            with_attention = "CrossAttn" in config.up_block_types[level]
            return f"output_blocks.{per_level * level + per_level - 1}.{2 if with_attention else 1}.{rest}"
        block = per_level * level + index
        return (
            f"output_blocks.{block}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"output_blocks.{block}.1.{rest}"
        )
    raise KeyError(f"no LDM name for UNet key {key}")


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    """(LDM name, whether the tensor is an attention projection stored as a 1x1 convolution)."""
    side, _, rest = key.partition(".")
    parts = rest.split(".")
    if side not in ("encoder", "decoder"):
        return key, False  # quant_conv, post_quant_conv
    if parts[0] == "conv_norm_out":
        return f"{side}.norm_out.{parts[1]}", False
    if parts[0] in ("conv_in", "conv_out"):
        return key, False
    if parts[0] == "mid_block":
        kind, index, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{index + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}", False
        for ours, theirs in VAE_ATTENTION.items():
            if tail.startswith(ours + "."):
                name = theirs + tail[len(ours) :]
                return f"{side}.mid.attn_1.{name}", name.endswith("weight") and theirs != "norm"
        raise KeyError(f"no LDM name for VAE key {key}")
    level, kind, index, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    ldm_level, group = (level, "down") if side == "encoder" else (levels - 1 - level, "up")
    if kind in ("downsamplers", "upsamplers"):
        return f"{side}.{group}.{ldm_level}.{group}sample.{tail}", False
    return f"{side}.{group}.{ldm_level}.block.{index}.{tail.replace('conv_shortcut', 'nin_shortcut')}", False


def _open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's tensors in OpenCLIP's names (q, k, v stacked into in_proj)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{theirs}attn.out_proj.{kind}"] = state.pop(f"{ours}self_attn.out_proj.{kind}")
            out[f"{theirs}ln_1.{kind}"] = state.pop(f"{ours}layer_norm1.{kind}")
            out[f"{theirs}ln_2.{kind}"] = state.pop(f"{ours}layer_norm2.{kind}")
            out[f"{theirs}mlp.c_fc.{kind}"] = state.pop(f"{ours}mlp.fc1.{kind}")
            out[f"{theirs}mlp.c_proj.{kind}"] = state.pop(f"{ours}mlp.fc2.{kind}")
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)}")
    return out


def ldm_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    """Every weight of ``pipe`` (UNet, VAE, text encoder) under the name an SD 2.x single file gives it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(key, pipe.unet.config)] = value
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name, conv = _vae_key(key, levels)
        out["first_stage_model." + name] = value[:, :, None, None] if conv else value
    for key, value in _open_clip(pipe.text_encoder.state_dict()).items():
        out["cond_stage_model.model." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


__all__ = ["ldm_checkpoint"]
