"""The tiny models' recipe: architectures, the training config, and the pieces every phase
shares (pixels, shifts, the learning-rate schedule, the class tokens, a clock). See tiny_training."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from actgen_generator.attention import class_token_weights
from actgen_generator.diffusers_classes import (
    StableDiffusionPipeline,
)
from actgen_generator.tiny_model import TINY_UNET, build_tiny_pipeline
from actgen_lab.backgrounds import HARD_SHARE_POOL
from actgen_shared.digits import DigitsSplit
from actgen_shared.digits import load_digits_split as shared_digits_split
from actgen_shared.labels import DIGITS
from actgen_shared.presets import PAPER

TINY_DIGITS_VERSION = "tiny-digits-v1"
TINY_BACKGROUNDS_VERSION = "tiny-backgrounds-v2"
IMAGE_SIZE = 32  # px: the generation size (digits upscaled from 8x8)
# The paper's prompt template first (the default of both presets); the longer one too, so
# both prompts work.
PROMPT_TEMPLATES = (PAPER["prompt"], "a photo of the digit {}")
DATASETS = ("digits", "backgrounds")

TINY_DIGITS_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 32),  # three blocks: 32x32 px -> 8x8 latents
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

TINY_DIGITS_UNET = {  # the generator's tiny UNet (same blocks and heads), wider, at 8x8 latents
    **TINY_UNET,
    "sample_size": IMAGE_SIZE // 4,
    "block_out_channels": (32, 64),
    "norm_num_groups": 16,
}

# Backgrounds: a wider VAE (textures, not just strokes) and cross-attention at the latent
# resolution only (down block 0, the last up block; the mid block keeps its own at 4x4), so
# the sampler reads eq. 8's mask at 8x8.
TINY_BACKGROUNDS_VAE = {**TINY_DIGITS_VAE, "block_out_channels": (16, 32, 64)}
TINY_BACKGROUNDS_UNET = {
    **TINY_DIGITS_UNET,
    "block_out_channels": (48, 96),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
# Backgrounds at 16x16 latents (v5, ``latent_side`` 16): a VAE that downsamples twice, not four
# times, so a 2-3 px stroke is most of its latent cells (8x8 cells of 4 px are mostly background: eq.
# 8's mask, applied every guided step, then held the background nearly as firmly as the digit), and
# a third UNet level; cross-attention again at the latent resolution only, so the mask is 16x16.
TINY_BACKGROUNDS_16_VAE = {
    **TINY_DIGITS_VAE,
    "block_out_channels": (32, 64),  # two blocks: 32x32 px -> 16x16 latents
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
}
TINY_BACKGROUNDS_16_UNET = {
    **TINY_DIGITS_UNET,
    "sample_size": IMAGE_SIZE // 2,
    "block_out_channels": (32, 64, 96),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (1, 2, 2),
}
LATENT_SIDES = (8, 16)  # backgrounds: the latent grid (px / 4 or px / 2); digits: 8 only
ARCHITECTURES = {
    ("digits", 8): (TINY_DIGITS_UNET, TINY_DIGITS_VAE),
    ("backgrounds", 8): (TINY_BACKGROUNDS_UNET, TINY_BACKGROUNDS_VAE),
    ("backgrounds", 16): (TINY_BACKGROUNDS_16_UNET, TINY_BACKGROUNDS_16_VAE),
}
VERSIONS = {"digits": TINY_DIGITS_VERSION, "backgrounds": TINY_BACKGROUNDS_VERSION}


@dataclass
class TinyTrainingConfig:
    """Everything that decides the trained weights (written next to them)."""

    data: str = "digits"
    minutes: float = 14.0  # wall-clock budget for both phases
    seed: int = 0
    vae_steps: int = 400
    unet_steps: int = 2000
    vae_share: float = 0.25  # share of the time budget the VAE phase may take at most
    vae_batch: int = 32
    unet_batch: int = 64
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    text_lr: float = 0.0  # 0: the random text encoder stays frozen (its prompts are already distinct)
    warmup_steps: int = 100
    kl_weight: float = 1e-4
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    max_shift: int = 2  # px of random translation (augmentation), at 32 px; backgrounds: none
    renders: int = 8  # backgrounds: renders of each train digit in the pool
    attn_weight: float = 0.0  # backgrounds: weight of the class-token attention loss
    log_every: int = 100
    # v2 (issue 25): what made v1 ignore the class and lose the colour
    class_tokens: str = "random"  # orthogonal: the digit names' token embeddings set orthogonal, frozen
    class_token_norm: float = 1.0  # norm of those embeddings (a random row's is ~0.1)
    digit_weight: float = 0.0  # backgrounds: extra epsilon-loss weight on a latent cell per digit share
    colour_weight: float = 0.0  # VAE: weight of an L1 loss on 4x4-pooled colours (keeps hue, not edges)
    checkpoint_every: int = 0  # UNet steps between checkpoints (and probes) written next to the output
    hard_share: float = HARD_SHARE_POOL  # backgrounds: share of the pool in each class's hard style (data v2)
    judges: str | None = None  # backgrounds: folder to load the reference and kind CNNs from (else trained)
    init_vae: str | None = None  # a model folder whose VAE (same architecture) the VAE phase starts from
    decoder_steps: int = 0  # phase 3: steps of decoder-only fine-tuning after the UNet (0: none)
    decoder_minutes: float = 14.0  # ... and its time budget (outside ``minutes``)
    # v3: the prompt also conditions every ResNet block, attention-pooled into the time embedding
    # (diffusers' ``addition_embed_type: text``), not only the cross-attention at 8x8 and 4x4
    pooled_text: bool = False
    # v5: the latent grid, 8 (32 px / 4) or, backgrounds only, 16 (32 px / 2; :data:`ARCHITECTURES`)
    latent_side: int = 8


def load_digits_split(image_size: int = IMAGE_SIZE) -> DigitsSplit:
    """The digits split exactly as the trainer splits them (``actgen_shared.digits``)."""
    return shared_digits_split(image_size)


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px, filling with the background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def schedule_lr(base: float, step: int, total: int, elapsed: float, budget: float, warmup: int) -> float:
    """Linear warmup, then a cosine to zero over steps or time, whichever is further along."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max(step / max(total, 1), elapsed / max(budget, 1e-9)))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


POOLED_TEXT_HEADS = 4  # attention-pooling heads of the pooled prompt (8 of the encoder's 32 dims each)


def build_untrained(
    seed: int,
    data: str = "digits",
    class_tokens: str = "random",
    class_token_norm: float = 1.0,
    pooled_text: bool = False,
    latent_side: int = 8,
) -> StableDiffusionPipeline:
    """The pipeline of ``data`` with random weights (same seed, same weights), text encoder frozen.

    ``class_tokens`` orthogonal: the digit names' token embeddings become orthogonal rows of norm
    ``class_token_norm`` (v2's conditioning, :func:`set_orthogonal_class_tokens`). ``pooled_text``:
    the UNet also adds the attention-pooled prompt to its time embedding (v3's conditioning; the
    same UNet class and call, so the generator loads and guides it as it does SD 2.1's).
    ``latent_side``: the latent grid, 8 or (backgrounds) 16 (:data:`ARCHITECTURES`)."""
    if (data, latent_side) not in ARCHITECTURES:
        known = ", ".join(f"{d} at {side}" for d, side in ARCHITECTURES)
        raise ValueError(f"no architecture for {data} at latent side {latent_side}; known: {known}")
    unet_config, vae_config = ARCHITECTURES[data, latent_side]
    if pooled_text:
        unet_config = {
            **unet_config,
            "addition_embed_type": "text",
            "addition_embed_type_num_heads": POOLED_TEXT_HEADS,
        }
    pipe = build_tiny_pipeline(seed, unet_config=unet_config, vae_config=vae_config)
    pipe.text_encoder.requires_grad_(False)
    if class_tokens == "orthogonal":
        set_orthogonal_class_tokens(pipe, list(DIGITS), class_token_norm, seed)
    elif class_tokens != "random":
        raise ValueError(f"unknown class_tokens {class_tokens!r}; known: random, orthogonal")
    return pipe


def set_orthogonal_class_tokens(
    pipe: StableDiffusionPipeline, class_names: list[str], norm: float, seed: int
) -> None:
    """Give each class name's tokens an embedding row orthogonal to every other class's, of ``norm``.

    Why: v1 trained the text encoder along with the UNet and it collapsed the ten class tokens
    into two groups (cosine 0.95-0.99), so the UNet could not tell most digits apart. A random row
    (std 0.02, norm ~0.1) is the size of the position embedding it is added to; rows of norm 1,
    mutually orthogonal, make the class position's output differ by class whatever the frozen
    random layers do (the model card gives the cosines, :func:`class_token_cosines`).
    """
    emb = pipe.text_encoder.get_input_embeddings().weight
    ids = [pipe.tokenizer(n, add_special_tokens=False).input_ids for n in class_names]
    flat = sorted({i for name_ids in ids for i in name_ids})
    if len(flat) > emb.shape[1]:
        raise ValueError(f"{len(flat)} class tokens do not fit {emb.shape[1]} orthogonal directions")
    gen = torch.Generator().manual_seed(seed + 7)
    q, _ = torch.linalg.qr(torch.randn(emb.shape[1], emb.shape[1], generator=gen))
    with torch.no_grad():
        for k, token in enumerate(flat):
            emb[token] = q[:, k] * norm


def class_weights(pipe_tokenizer, class_names: list[str]) -> torch.Tensor:
    """(templates, classes, 77) weights of each prompt's class-name tokens (as the sampler reads)."""
    return torch.stack(
        [
            torch.stack([class_token_weights(pipe_tokenizer, n, template) for n in class_names])
            for template in PROMPT_TEMPLATES
        ]
    )


@torch.no_grad()
def class_token_cosines(pipe: StableDiffusionPipeline, class_names: list[str]) -> np.ndarray:
    """Cosine similarity (classes x classes) of the text encoder's output at the class-name
    position of ``PROMPT_TEMPLATES[0]`` (what the class token's cross-attention keys are made of)."""
    ids = prompt_ids(pipe, class_names)[: len(class_names)]
    out = pipe.text_encoder(ids)[0]
    weights = class_weights(pipe.tokenizer, class_names)[0]  # (classes, 77)
    vec = torch.einsum("ctd,ct->cd", out, weights)
    vec = F.normalize(vec, dim=1)
    return (vec @ vec.T).numpy()


def prompt_ids(pipe: StableDiffusionPipeline, class_names: list[str]) -> torch.Tensor:
    """Token ids (len(templates) * classes + 1, 77) of every prompt, the empty prompt last.

    Tokenised as ``encode_prompt`` tokenises (padded to the tokenizer's length), so the text
    encoder sees in training exactly what it sees in the sampler.
    """
    texts = [template.format(n) for template in PROMPT_TEMPLATES for n in class_names] + [""]
    tok = pipe.tokenizer
    return tok(
        texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def embed_prompts(
    text_encoder: CLIPTextModel, ids: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (templates, classes, 77, d) of the prompts and (77, d) of the empty prompt."""
    out = text_encoder(ids.to(text_encoder.device))[0]
    return out[:-1].view(-1, n_classes, *out.shape[1:]), out[-1]


class Clock:
    """Elapsed seconds since construction."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start
