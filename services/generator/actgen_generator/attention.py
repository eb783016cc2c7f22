"""Class-token cross-attention maps, recorded during the sampler's normal UNet forward (paper 4.2).

An attention processor on the cross-attention layers at the mask resolution (latent/4, as in
Attend-and-Excite: 16x16 for SD at 512 px; the nearest resolution with cross-attention in a
model that has none there) computes its output with fused attention (scaled_dot_product_attention)
and, while a step records, the attention probabilities of the conditional rows alone, explicitly,
reduced to their class-token map. The map leaves the layer through a tensor the sampler passes in
(:class:`ClassTokenRecord`, ``cross_attention_kwargs``) and the layer fills with a tensor op: no
Python state changes inside the UNet, so ``ACTGEN_COMPILE`` traces the recording layers into its
graph without a break (docs/architecture.md 5.4; ``tests/test_compile.py`` counts the breaks).
Every other layer is diffusers' fused ``AttnProcessor2_0``, which never materialises the probabilities.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from actgen_shared.presets import PLACEHOLDER, prompt_text

MASK_FACTOR = 4  # mask resolution = latent size / 4 (16x16 for 64x64 SD latents)
# the UNet's cross_attention_kwargs key carrying a ClassTokenRecord: every processor's keyword parameter
RECORD_KWARG = "class_token_record"


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


class ClassTokenRecord(NamedTuple):
    """What one UNet call records, passed to every attention layer as ``cross_attention_kwargs``.

    ``weights`` (rows, tokens): the class-token weights of the call's recorded rows, which are its
    *last* ``rows`` rows (the conditional half of the CFG batch: ``GuidedSampler._cfg_rows`` puts the
    unconditional rows first). ``maps`` (layers, rows, queries): filled by the recording layers, one
    slot each, with ``copy_``: a tensor op on a tensor the caller holds, no Python state changed, so
    a compiled UNet records inside its graph; written again identically by a checkpointed re-forward.
    """

    weights: torch.Tensor
    maps: torch.Tensor


class AttentionRecorder:
    """Accumulates, per item, the class-token attention of one denoising step.

    Before each UNet call the sampler asks for that call's :class:`ClassTokenRecord` (:meth:`record`:
    None when this step records nothing) and passes it to the UNet; after the call it hands the
    filled record back (:meth:`collect`), which adds each item's maps into a per-item sum, and
    :meth:`step_maps` averages over layers. The recording layers never see this object.
    """

    def __init__(self, factor: int, layers: int = 0) -> None:
        self.factor = factor
        self.layers = layers  # recording processors on the UNet (install_recorder sets it)
        self.recording = False
        self.map_hw = (0, 0)
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def begin_step(self, batch_size: int, latent_hw: tuple[int, int], device: torch.device) -> None:
        """Start recording one step for ``batch_size`` items."""
        h, w = (math.ceil(s / self.factor) for s in latent_hw)
        self.map_hw = (h, w)
        self._sum = torch.zeros(batch_size, h * w, device=device, dtype=torch.float32)
        self._count = torch.zeros(batch_size, device=device, dtype=torch.float32)
        self.recording = True

    def record(self, weights: torch.Tensor) -> ClassTokenRecord | None:
        """The next UNet call's record, for its last ``len(weights)`` rows weighted by ``weights``;
        None when the step is not recording or the call has no such rows."""
        if not self.recording or weights.shape[0] == 0:
            return None
        queries = self.map_hw[0] * self.map_hw[1]
        maps = weights.new_zeros((self.layers, weights.shape[0], queries), dtype=torch.float32)
        return ClassTokenRecord(weights.float(), maps)

    def collect(self, items: torch.Tensor, record: ClassTokenRecord) -> None:
        """Add a UNet call's filled record into the sums of ``items`` (one per recorded row)."""
        total, count = self._sums()
        total.index_add_(0, items, record.maps.sum(0))
        count.index_add_(0, items, torch.full_like(items, self.layers, dtype=torch.float32))

    def reset(self) -> None:
        """Stop recording and drop this step's sums (after the loop, however it ended)."""
        self.recording = False
        self._sum = self._count = None

    def step_maps(self) -> torch.Tensor:
        """This step's class-token map per item, averaged over layers: (batch, h, w)."""
        self.recording = False
        total, count = self._sums()
        maps = total / count.clamp(min=1.0)[:, None]
        return maps.view(-1, *self.map_hw)

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's per-item map sum and layer count; they exist once :meth:`begin_step` ran."""
        if self._sum is None or self._count is None:
            raise RuntimeError("AttentionRecorder used before begin_step")
        return self._sum, self._count


class AttentionProbe(Protocol):
    """An eager observer of a recording layer's full probabilities, graph kept (a training loss:
    lab/actgen_lab/tiny_unet_training.py sets it as a processor's ``recorder``)."""

    recording: bool

    def add(self, probs: torch.Tensor, heads: int) -> None: ...


class FusedAttnProcessor(AttnProcessor2_0):
    """diffusers' fused attention (SDPA) that takes the recorder's keyword and ignores it: diffusers
    hands ``cross_attention_kwargs`` to every layer and drops, with a warning each call, a keyword
    that a processor's signature does not name."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        class_token_record: ClassTokenRecord | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class RecordingAttnProcessor:
    """Cross-attention at the mask resolution: fused attention for the layer's output and, given a
    :class:`ClassTokenRecord`, the class-token map of the recorded (conditional) rows only, written
    into the record's slot ``slot``. Pure tensor work: nothing here breaks a compiled graph.

    ``recorder``: an :class:`AttentionProbe` that wants every row's probabilities with their graph
    (the tiny models' training); that path is eager (``torch.compiler.disable``) and never the sampler's.
    """

    def __init__(self, slot: int = 0, recorder: AttentionProbe | None = None) -> None:
        self.slot = slot
        self.recorder = recorder
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        class_token_record: ClassTokenRecord | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and self.recorder is not None and self.recorder.recording:
            return self._probed(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is None or class_token_record is None:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._recording(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, class_token_record
        )

    def _recording(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        record: ClassTokenRecord,
    ) -> torch.Tensor:
        """AttnProcessor2_0's computation, plus the class-token map of the last rows into the record."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        mask = None
        if attention_mask is not None:  # (batch * heads, 1 or queries, tokens)
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        # the map: explicit probabilities of the recorded rows only (the batch's last rows), detached
        first = batch_size - record.weights.shape[0]
        if attention_mask is not None:
            mask = attention_mask[first * attn.heads :]
        with torch.no_grad():
            probs = attn.get_attention_scores(
                attn.head_to_batch_dim(query[first:]), attn.head_to_batch_dim(key[first:]), mask
            )
            maps = torch.einsum("rhqk,rk->rq", probs.unflatten(0, (-1, attn.heads)).float(), record.weights)
            record.maps[self.slot].copy_(maps / attn.heads)
        # the layer's output: fused attention over every row, as AttnProcessor2_0 computes it
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attention_mask is not None:
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @torch.compiler.disable  # the probe's maps are Python-side state (a list it appends to)
    def _probed(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        """The explicit path of diffusers' AttnProcessor, every row's probabilities to the probe."""
        assert self.recorder is not None
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
    """Put recording processors on the cross-attention at the mask resolution (one record slot
    each), fused attention that takes the record's keyword elsewhere."""
    factor = mask_block_factor(unet, target_factor)
    n_blocks = len(unet.config.block_out_channels)
    cross = {
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }
    processors: dict[str, RecordingAttnProcessor | FusedAttnProcessor] = {}
    slots = 0
    for name in unet.attn_processors:
        module_name = name.removesuffix(".processor")
        if module_name in cross and _block_factor(name, n_blocks) == factor:
            processors[name] = RecordingAttnProcessor(slots)
            slots += 1
        else:
            processors[name] = FusedAttnProcessor()
    if not slots:
        raise ValueError(f"no cross-attention layer found at downsampling factor {factor}")
    unet.set_attn_processor(processors)
    return AttentionRecorder(factor, slots)


def normalize_mask(accumulated: torch.Tensor) -> torch.Tensor:
    """Scale each image's accumulated map to [0, 1] (min-max per image)."""
    flat = accumulated.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp(min=1e-12)).view_as(accumulated)


def upsample_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(batch, h, w) map -> (batch, 1, H, W) at the latent's size (bilinear)."""
    return F.interpolate(mask[:, None], size=latent_hw, mode="bilinear", align_corners=False)
