"""Class-token cross-attention maps, recorded during the sampler's normal UNet forward (paper 4.2).

An attention processor on the cross-attention layers at the mask resolution (latent/4, as in
Attend-and-Excite: 16x16 for SD at 512 px; the nearest resolution with cross-attention in a
model that has none there) computes the attention probabilities explicitly while recording is
on, and keeps only the class-token map of the rows it is told to record. Every other layer keeps
diffusers' fused ``AttnProcessor2_0`` (scaled_dot_product_attention), which never materialises
the probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from actgen_shared.presets import PLACEHOLDER, prompt_text

MASK_FACTOR = 4  # mask resolution = latent size / 4 (16x16 for 64x64 SD latents)


def class_token_weights(tokenizer, class_name: str, template: str) -> torch.Tensor:
    """Weights over the prompt's token positions: 1/n on each of the class name's n tokens.

    ``template`` is ``options.prompt`` (one ``{}``). The positions are found by tokenising, so
    multi-token names and any template work: where the text before ``{}`` ends, else (a template
    whose prefix merges with the name) the first place the name's tokens stand whole.
    """
    ids = tokenizer(
        prompt_text(template, class_name),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    name_ids = tokenizer(class_name, add_special_tokens=False).input_ids
    n = len(name_ids)
    prefix = template.split(PLACEHOLDER)[0]
    after_prefix = 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids)  # 1: the start token
    starts = [after_prefix, *range(1, len(ids) - n + 1)]
    for start in starts:
        if n and ids[start : start + n] == name_ids:
            weights = torch.zeros(len(ids))
            weights[start : start + n] = 1.0 / n
            return weights
    raise ValueError(
        f"class name {class_name!r} is not found whole in its tokenised prompt "
        f"{prompt_text(template, class_name)!r} (within {tokenizer.model_max_length} tokens)"
    )


def mask_block_factor(unet, target: int = MASK_FACTOR) -> int:
    """Downsampling factor of the cross-attention blocks nearest to ``target`` (log scale)."""
    n = len(unet.config.block_out_channels)
    factors = {2**i for i, kind in enumerate(unet.config.down_block_types) if "CrossAttn" in kind}
    factors |= {2 ** (n - 1 - j) for j, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    if not factors:
        raise ValueError("the UNet has no cross-attention blocks: no attention mask can be read")
    return min(factors, key=lambda f: (abs(math.log2(f) - math.log2(target)), -f))


def _block_factor(name: str, n_blocks: int) -> int | None:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (n_blocks - 1 - int(parts[1]))
    return None  # mid block and others: not used for the mask (Attend-and-Excite: up/down only)


class AttentionRecorder:
    """Accumulates, per item, the class-token attention of one denoising step.

    Before each UNet call the sampler says which rows of that call to record, for which items,
    with which token weights (:meth:`expect`); the processors add ``mean over heads of
    probs @ weights`` into a per-item sum, and :meth:`step_maps` averages over layers.
    """

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.recording = False
        self._rows: torch.Tensor | None = None
        self._items: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def begin_step(self, batch_size: int, latent_hw: tuple[int, int], device: torch.device) -> None:
        """Start recording one step for ``batch_size`` items."""
        h, w = (math.ceil(s / self.factor) for s in latent_hw)
        self.map_hw = (h, w)
        self._sum = torch.zeros(batch_size, h * w, device=device, dtype=torch.float32)
        self._count = torch.zeros(batch_size, device=device, dtype=torch.float32)
        self.recording = True

    def expect(
        self, rows: torch.Tensor | None, items: torch.Tensor | None, weights: torch.Tensor | None
    ) -> None:
        """The next UNet call: record batch ``rows`` as ``items``, class tokens weighted by ``weights``.

        ``expect(None, None, None)`` records nothing until the next ``expect``.
        """
        self._rows, self._items, self._weights = rows, items, weights

    def add(self, probs: torch.Tensor, heads: int) -> None:
        """Add one layer's attention probabilities, shaped (batch * heads, queries, tokens)."""
        rows, items, weights = self._rows, self._items, self._weights
        if rows is None or rows.numel() == 0:
            return
        if items is None or weights is None:
            raise RuntimeError("AttentionRecorder.expect named rows without their items and weights")
        total, count = self._sums()
        probs = probs.detach().unflatten(0, (-1, heads))[rows]  # (rows, heads, q, k)
        maps = torch.einsum("rhqk,rk->rq", probs.float(), weights) / heads
        total.index_add_(0, items, maps)
        count.index_add_(0, items, torch.ones_like(items, dtype=torch.float32))

    def reset(self) -> None:
        """Stop recording and drop this step's sums (after the loop, however it ended)."""
        self.recording = False
        self._rows = self._items = self._weights = None
        self._sum = self._count = None

    def step_maps(self) -> torch.Tensor:
        """This step's class-token map per item, averaged over layers: (batch, h, w)."""
        self.recording = False
        self._rows = None
        total, count = self._sums()
        maps = total / count.clamp(min=1.0)[:, None]
        return maps.view(-1, *self.map_hw)

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's per-item map sum and layer count; they exist once :meth:`begin_step` ran."""
        if self._sum is None or self._count is None:
            raise RuntimeError("AttentionRecorder used before begin_step")
        return self._sum, self._count


class RecordingAttnProcessor:
    """Cross-attention that exposes its probabilities to an :class:`AttentionRecorder`."""

    def __init__(self, recorder: AttentionRecorder) -> None:
        self.recorder = recorder
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.recorder.recording or encoder_hidden_states is None:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._recording(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    @torch.compiler.disable  # the recorder's sums are Python-side state: kept out of a compiled graph
    def _recording(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        # The explicit path of diffusers' AttnProcessor, keeping the probabilities.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:  # diffusers returns None for None, though its hint says Tensor
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.recorder.add(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_recorder(unet, target_factor: int = MASK_FACTOR) -> AttentionRecorder:
    """Put recording processors on the cross-attention at the mask resolution, SDPA elsewhere."""
    factor = mask_block_factor(unet, target_factor)
    recorder = AttentionRecorder(factor)
    n_blocks = len(unet.config.block_out_channels)
    cross = {
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }
    processors: dict[str, RecordingAttnProcessor | AttnProcessor2_0] = {}
    for name in unet.attn_processors:
        module_name = name.removesuffix(".processor")
        if module_name in cross and _block_factor(name, n_blocks) == factor:
            processors[name] = RecordingAttnProcessor(recorder)
        else:
            processors[name] = AttnProcessor2_0()
    if not any(isinstance(p, RecordingAttnProcessor) for p in processors.values()):
        raise ValueError(f"no cross-attention layer found at downsampling factor {factor}")
    unet.set_attn_processor(processors)
    return recorder


def normalize_mask(accumulated: torch.Tensor) -> torch.Tensor:
    """Scale each image's accumulated map to [0, 1] (min-max per image)."""
    flat = accumulated.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp(min=1e-12)).view_as(accumulated)


def upsample_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(batch, h, w) map -> (batch, 1, H, W) at the latent's size (bilinear)."""
    return F.interpolate(mask[:, None], size=latent_hw, mode="bilinear", align_corners=False)
