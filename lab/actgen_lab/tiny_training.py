"""Train the tiny SD-architecture models: the digits (the embedded default) and the digits on
procedural backgrounds (the ablation's testbed, ``actgen_lab.backgrounds``).

Same classes and file layout as SD 2.1 base (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel, the tiny byte-pair CLIPTokenizer, DDPMScheduler with SD 2.1's
betas and epsilon prediction), so the result loads through ``StableDiffusionPipeline.from_pretrained``
and the guided sampler runs on it unchanged. Generation size is 32 px: the VAE maps a 32x32 RGB
digit to a 4x8x8 latent (scale factor 4, the digits' own 8x8 resolution), which keeps the UNet
small enough to become class-conditional in minutes on two CPU cores.

Training runs in two phases inside one time budget:

1. the VAE (reconstruction + a small KL term), then frozen; its ``scaling_factor`` is set so
   the training latents have unit variance, as SD's 0.18215 does for its VAE;
2. the UNet on those latents with SD's epsilon objective, prompts ``a photo of {name}`` (the
   sampler's template) and ``a photo of the digit {name}``, the empty prompt with probability
   ``prompt_dropout`` (for classifier-free guidance), and an EMA of its weights, which is what
   is saved.

The text encoder is a random-weight two-layer CLIP, frozen by default: its outputs for the ten
digit prompts are already distinct (the class token and the positions after it differ), so the
prompts are encoded once; ``text_lr`` > 0 trains it along with the UNet instead. Each phase's learning rate
follows a cosine to zero over its share of the steps or of the time, whichever runs out first,
so a slower machine still ends its schedule.

``--data backgrounds`` trains on a pool of every train digit on every background kind (no
class-background correlation), with a UNet whose cross-attention sits at the latent resolution
(8x8, so eq. 8's mask has 8x8 cells of 4 px, not the 4x4 of the digits model). ``attn_weight`` > 0
adds a loss that teaches the class token's cross-attention where the digit is (binary
cross-entropy of the class-token attention against the digit's share of each latent cell, at the
layers the sampler reads the mask from): what a large model learns from its captions and a tiny
one cannot from ten prompts (the model card gives the mask IoU with and without it).

Backgrounds v2 (issue 25) fixes what made v1 draw grey digits of the wrong class: the VAE gets a
loss on pooled colours and chroma (``colour_weight``) and more steps, so reconstructions keep the
colour; the text encoder stays frozen and the digit names' token embeddings are set orthogonal
(``class_tokens``; v1's jointly trained encoder had collapsed them, cosine up to 0.99); the
epsilon loss is weighted toward the digit's latent cells (``digit_weight``, from the true masks);
``checkpoint_every`` probes ``random`` mode (the issue's stop rule) and writes ``OUT.ckpt`` as
it goes, so a long background run can be checked and stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from actgen_generator.attention import (
    RecordingAttnProcessor,
    class_token_weights,
    install_recorder,
)
from actgen_generator.diffusers_classes import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from actgen_generator.tiny_model import SD21_SCHEDULER, TINY_TEXT, build_tiny_pipeline
from actgen_lab.backgrounds import REFERENCE_FILE, ReferenceClassifier, broad_scenes
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

TINY_DIGITS_UNET = dict(
    sample_size=IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2),  # diffusers' name for the number of heads (as SD 2.1's config)
    cross_attention_dim=TINY_TEXT["hidden_size"],
    use_linear_projection=True,
    norm_num_groups=16,
)

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
ARCHITECTURES = {
    "digits": (TINY_DIGITS_UNET, TINY_DIGITS_VAE),
    "backgrounds": (TINY_BACKGROUNDS_UNET, TINY_BACKGROUNDS_VAE),
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
    hard_share: float = 0.5  # backgrounds: share of the pool in each class's hard style (data v2)
    judges: str | None = None  # backgrounds: folder to load the reference and kind CNNs from (else trained)
    init_vae: str | None = None  # a model folder whose VAE (same architecture) the VAE phase starts from
    decoder_steps: int = 0  # phase 3: steps of decoder-only fine-tuning after the UNet (0: none)
    decoder_minutes: float = 14.0  # ... and its time budget (outside ``minutes``)


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


def build_untrained(
    seed: int, data: str = "digits", class_tokens: str = "random", class_token_norm: float = 1.0
) -> StableDiffusionPipeline:
    """The pipeline of ``data`` with random weights (same seed, same weights), text encoder frozen.

    ``class_tokens`` orthogonal: the digit names' token embeddings become orthogonal rows of norm
    ``class_token_norm`` (v2's conditioning, :func:`set_orthogonal_class_tokens`)."""
    unet_config, vae_config = ARCHITECTURES[data]
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


class _Clock:
    """Elapsed seconds since construction."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: TinyTrainingConfig,
    budget_s: float,
    generator: torch.Generator,
) -> dict:
    """Phase 1: reconstruction (L1 + MSE) plus ``kl_weight`` KL; returns a summary."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    clock, n = _Clock(), len(images)
    bar = tqdm(range(cfg.vae_steps), desc="vae", unit="step", dynamic_ncols=True, mininterval=2.0)
    recon = kl = float("nan")
    step = 0
    for step in bar:
        if clock() > budget_s:
            break
        for group in opt.param_groups:
            group["lr"] = schedule_lr(cfg.vae_lr, step, cfg.vae_steps, clock(), budget_s, cfg.warmup_steps)
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=generator)
        x = random_shift(images[idx], cfg.max_shift, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        out = vae.decode(z).sample
        rec = F.l1_loss(out, x) + F.mse_loss(out, x)
        if cfg.colour_weight > 0:  # v1's VAE decoded grey: weigh the colours (4x4 means, chroma)
            rec = rec + cfg.colour_weight * (
                F.l1_loss(F.avg_pool2d(out, 4), F.avg_pool2d(x, 4)) + F.l1_loss(_chroma(out), _chroma(x))
            )
        kl_term = posterior.kl().mean() / z[0].numel()
        loss = rec + cfg.kl_weight * kl_term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recon, kl = float(rec.detach()), float(kl_term.detach())
        if step % cfg.log_every == 0:
            bar.set_postfix(recon=f"{recon:.4f}", kl=f"{kl:.2f}")
            tqdm.write(f"vae step {step} recon {recon:.4f} kl {kl:.3f} lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval().requires_grad_(False)
    return {
        "steps": step + 1 if clock() <= budget_s else step,
        "seconds": round(clock(), 1),
        "final_recon_loss": recon,
        "final_kl": kl,
    }


def finetune_decoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: TinyTrainingConfig,
    steps: int,
    budget_s: float,
    generator: torch.Generator,
) -> dict:
    """Phase 3 (optional): the VAE's decoder alone, on the frozen encoder's latents, with the
    phase-1 loss (colour terms included); returns a summary.

    The encoder does not change, so neither do the latents the UNet learnt: SD's own VAE had its
    decoder fine-tuned the same way. v2 uses it because the VAE phase's share of a CPU budget
    leaves its reconstructions short of the colour; this buys colour without retraining the UNet.
    """
    vae.eval().requires_grad_(False)
    params = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:
        params += list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr * 0.5, weight_decay=0.0)
    clock, n, step, recon = _Clock(), len(images), 0, float("nan")
    for step in range(steps):
        if clock() > budget_s:
            break
        for group in opt.param_groups:
            group["lr"] = schedule_lr(cfg.vae_lr * 0.5, step, steps, clock(), budget_s, cfg.warmup_steps)
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=generator)
        x = images[idx]
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        out = vae.decode(z).sample
        rec = F.l1_loss(out, x) + F.mse_loss(out, x)
        if cfg.colour_weight > 0:
            rec = rec + cfg.colour_weight * (
                F.l1_loss(F.avg_pool2d(out, 4), F.avg_pool2d(x, 4)) + F.l1_loss(_chroma(out), _chroma(x))
            )
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        recon = float(rec.detach())
        if step % cfg.log_every == 0:
            tqdm.write(f"decoder step {step} recon {recon:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval().requires_grad_(False)
    return {
        "steps": step + 1 if clock() <= budget_s else step,
        "seconds": round(clock(), 1),
        "final_recon_loss": recon,
    }


def _chroma(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's colour less its grey level (N x 3 x H x W): zero for a grey image."""
    return x - x.mean(1, keepdim=True)


def colour_saturation(images: np.ndarray) -> float:
    """Mean over pixels of the standard deviation across R, G, B (in [0, 1]) of uint8 N x H x W x 3
    images: 0 for grey, larger the more coloured. The issue's measure (0.111 on v1's originals,
    0.008 on its reconstructions); unlike HSV saturation it does not blow up on dark pixels."""
    return float((images.astype(np.float64) / 255.0).std(-1).mean())


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 images through the VAE (posterior mean, decoded) back to uint8."""
    out = []
    for i in range(0, len(images), batch):
        x = to_model_pixels(images[i : i + batch]).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros_like(images)


@torch.no_grad()
def latent_stats(
    vae: AutoencoderKL, images: torch.Tensor, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class AttentionProbe:
    """The class token's cross-attention in a training batch, graph kept (the attention loss).

    Stands in for the sampler's ``AttentionRecorder`` behind the same ``RecordingAttnProcessor``
    on the same layers (the mask resolution), so the loss trains exactly the maps eq. 8 reads.
    """

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.recording = False
        self.weights: torch.Tensor | None = None  # (B, 77) class-token weights of each row
        self.maps: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor, heads: int) -> None:
        """One layer's probabilities (B * heads, queries, tokens) -> the class-token map (B, queries)."""
        assert self.weights is not None
        mean = probs.unflatten(0, (-1, heads)).mean(1)
        self.maps.append(torch.einsum("bqk,bk->bq", mean, self.weights))

    def take(self) -> torch.Tensor:
        """The batch's class-token map averaged over the layers (B, queries); resets."""
        maps, self.maps = torch.stack(self.maps).mean(0), []
        return maps


def attach_probe(unet: UNet2DConditionModel) -> AttentionProbe:
    """Recording processors at the mask resolution (as the sampler installs), feeding a probe."""
    recorder = install_recorder(unet)
    probe = AttentionProbe(recorder.factor)
    for processor in unet.attn_processors.values():
        if isinstance(processor, RecordingAttnProcessor):
            processor.recorder = probe  # type: ignore[assignment]  # same two members are used
    return probe


def mask_targets(masks: torch.Tensor, latent_side: int, factor: int) -> torch.Tensor:
    """bool N x S x S foreground masks -> the digit's share of each attention cell, N x cells."""
    side = latent_side // factor
    return F.adaptive_avg_pool2d(masks[:, None].float(), side).flatten(1)


def class_weights(pipe_tokenizer, class_names: list[str]) -> torch.Tensor:
    """(templates, classes, 77) weights of each prompt's class-name tokens (as the sampler reads)."""
    return torch.stack(
        [
            torch.stack([class_token_weights(pipe_tokenizer, n, template) for n in class_names])
            for template in PROMPT_TEMPLATES
        ]
    )


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error, each latent cell weighted by ``weights`` (N x 1 x h x w; None: plain).

    A weighted mean, so the loss keeps its scale: with the digit's cells weighted up (v2), the
    class-dependent part of the image is a larger share of the objective than its ~20 % of pixels.
    """
    if weights is None:
        return F.mse_loss(pred, target)
    return (weights * (pred - target) ** 2).sum() / (weights.sum() * pred.shape[1])


def digit_cell_weights(masks: torch.Tensor, latent_side: int, digit_weight: float) -> torch.Tensor:
    """bool N x S x S digit masks -> N x 1 x s x s loss weights, 1 + ``digit_weight`` x digit share."""
    return 1.0 + digit_weight * F.adaptive_avg_pool2d(masks[:, None].float(), latent_side)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    ids: torch.Tensor,
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    scaling: float,
    cfg: TinyTrainingConfig,
    budget_s: float,
    generator: torch.Generator,
    on_log: Callable[[int, UNet2DConditionModel, CLIPTextModel], None] | None = None,
    attention: tuple[AttentionProbe, torch.Tensor, torch.Tensor] | None = None,
    cell_weights: torch.Tensor | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    """Phase 2: epsilon prediction under SD 2.1's schedule, the text encoder trained along when
    ``cfg.text_lr`` > 0; returns the EMA UNet, the (EMA) text encoder and a summary.

    ``attention``: (probe, per-image mask targets N x cells, class-token weights) adds
    ``cfg.attn_weight`` x the attention loss on the rows that have a prompt. ``cell_weights``
    (N x 1 x h x w, per image and latent cell) weighs the epsilon loss (v2: toward the digit).
    """
    scheduler = DDPMScheduler(**SD21_SCHEDULER)
    n_classes = len(DIGITS)
    train_text = cfg.text_lr > 0
    models: list[torch.nn.Module] = [unet, text_encoder] if train_text else [unet]
    for m in models:
        m.train().requires_grad_(True)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False) if train_text else text_encoder
    emas: list[torch.nn.Module] = [ema_unet, ema_text] if train_text else [ema_unet]
    groups = [{"params": list(unet.parameters()), "base_lr": cfg.unet_lr}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "base_lr": cfg.text_lr})
    else:
        with torch.no_grad():
            prompts, empty = embed_prompts(text_encoder, ids, n_classes)
    opt = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=0.01)
    params = [p for m in models for p in m.parameters()]
    mean, std = latents
    n, n_templates = len(mean), len(PROMPT_TEMPLATES)
    clock = _Clock()
    bar = tqdm(range(cfg.unet_steps), desc="unet", unit="step", dynamic_ncols=True, mininterval=2.0)
    running, step, attn_running = float("nan"), 0, float("nan")
    for step in bar:
        if clock() > budget_s:
            break
        for group in opt.param_groups:
            group["lr"] = schedule_lr(
                group["base_lr"], step, cfg.unet_steps, clock(), budget_s, cfg.warmup_steps
            )
        if train_text:  # 21 prompts: cheap next to the UNet batch
            prompts, empty = embed_prompts(text_encoder, ids, n_classes)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=generator)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=generator)
        xt = scheduler.add_noise(x0, noise, t)
        template = torch.randint(0, n_templates, (cfg.unet_batch,), generator=generator)
        cond = prompts[template, labels[idx]]
        drop = torch.rand(cfg.unet_batch, generator=generator) < cfg.prompt_dropout
        cond = torch.where(drop.view(-1, 1, 1), empty.expand_as(cond), cond)
        if attention is not None:
            probe, targets, token_weights = attention
            probe.weights = token_weights[template, labels[idx]] * (~drop)[:, None]
            probe.recording = True
        pred = unet(xt, t, encoder_hidden_states=cond, return_dict=False)[0]
        loss = weighted_mse(pred, noise, None if cell_weights is None else cell_weights[idx])
        if attention is not None:
            probe.recording = False
            maps, keep = probe.take(), ~drop
            attn_loss = F.binary_cross_entropy(maps[keep].clamp(1e-6, 1 - 1e-6), targets[idx][keep])
            attn_running = float(attn_loss.detach())
            loss = loss + cfg.attn_weight * attn_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in zip(emas, models, strict=True):
                for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1.0 - decay)
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.98 * running + 0.02 * value
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            extra = f" attn {attn_running:.4f}" if attention is not None else ""
            tqdm.write(f"unet step {step} loss {running:.4f}{extra} lr {opt.param_groups[0]['lr']:.2e}")
        if on_log is not None:  # every step: the callback decides (checkpoints)
            on_log(step, ema_unet, ema_text)
    done = step + 1 if clock() <= budget_s else step
    text_encoder.eval().requires_grad_(False)
    summary = {"steps": done, "seconds": round(clock(), 1), "final_loss": running}
    if attention is not None:
        summary["final_attn_loss"] = attn_running
    return ema_unet, ema_text, summary


KIND_FILE = "kind_classifier.safetensors"  # which background kind a scene shows (eval-model)


def train_kind_classifier(seed: int = 1, renders: int = 6, epochs: int = 8, batch: int = 64):
    """The reference CNN's network trained to name a scene's background kind instead of its digit
    (on :func:`broad_scenes`, digits on top): how ``eval-model`` tells whether ig keeps and aig
    changes the guide's background. Returns a ``backgrounds.ReferenceClassifier`` (same file format)."""
    from actgen_lab.backgrounds import _reference_network

    pool = broad_scenes(renders, seed, hard_share=0.5)  # as the reference CNN's pool
    x, y = to_model_pixels(pool.images), torch.from_numpy(pool.kinds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _reference_network()
        opt = torch.optim.Adam(module.parameters(), lr=3e-3)
        steps = epochs * (len(x) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        module.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for i in range(len(x) // batch):
                idx = order[i * batch : (i + 1) * batch]
                loss = F.cross_entropy(module(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return ReferenceClassifier(module)


@torch.no_grad()
def probe_random_accuracy(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    prompts: torch.Tensor,
    empty: torch.Tensor,
    scaling: float,
    reference: ReferenceClassifier,
    guidance: float,
    per_class: int = 5,
    steps: int = 20,
    seed: int = 0,
) -> float:
    """Share of plain DDPM samples (prompt only, CFG ``guidance``) the reference reads as their
    prompt's digit: the training curve and the issue's stop rule (not the sampler; eval-model is)."""
    scheduler = DDPMScheduler(**SD21_SCHEDULER)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(DIGITS)).repeat_interleave(per_class)
    cond = prompts[0, labels]
    side = int(unet.config["sample_size"])
    x = torch.randn((len(labels), 4, side, side), generator=gen)
    for t in scheduler.timesteps:
        if guidance == 1.0:
            eps = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        else:
            both = torch.cat([empty.expand_as(cond), cond])
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both, return_dict=False)[0].chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    images = vae.decode(x / scaling).sample
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean(reference.predict(pixels) == labels.numpy()))


def train_tiny_model(out_dir: str | Path, cfg: TinyTrainingConfig, command: str | None = None) -> Path:
    """Train on ``cfg.data`` and write a diffusers folder (plus ``actgen_tiny.json``, README.md) to ``out_dir``."""
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown training data {cfg.data!r}; known: {list(DATASETS)}")
    if cfg.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {cfg.minutes}")
    out = Path(out_dir).expanduser().resolve()
    total_clock = _Clock()
    budget = cfg.minutes * 60.0
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    version = VERSIONS[cfg.data]
    masks: torch.Tensor | None = None
    if cfg.data == "backgrounds":
        pool = broad_scenes(cfg.renders, cfg.seed, hard_share=cfg.hard_share)
        images, labels = to_model_pixels(pool.images), torch.from_numpy(pool.labels)
        masks = torch.from_numpy(pool.masks)
        what = f"{len(images)} digits on backgrounds ({cfg.renders} renders of each train digit)"
    else:
        split = load_digits_split()
        images, labels = to_model_pixels(split.train_images), torch.from_numpy(split.train_labels)
        what = f"{len(images)} digits"
    pipe = build_untrained(cfg.seed, cfg.data, cfg.class_tokens, cfg.class_token_norm)
    if cfg.init_vae:  # continue a VAE (v2: v1's, which had learnt the shapes but not the colours)
        start = AutoencoderKL.from_pretrained(Path(cfg.init_vae).expanduser(), subfolder="vae")
        pipe.vae.load_state_dict(start.state_dict())
    print(
        f"training {version} on {what} for at most {cfg.minutes:g} min "
        f"(seed {cfg.seed}, {torch.get_num_threads()} threads); "
        f"unet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M params, "
        f"vae {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f} M",
        flush=True,
    )

    reference = kinds = None
    if cfg.data == "backgrounds" and cfg.judges:  # trained elsewhere (a parallel process, an earlier run)
        pass  # loaded by load_judges() once they are there: the first checkpoint, or the end
    elif cfg.data == "backgrounds":  # the testbed's judges ship with its generator (outside the budget)
        clock = _Clock()
        reference, kinds = ReferenceClassifier.train(), train_kind_classifier()
        print(f"reference and kind classifiers trained in {clock():.0f} s (outside the budget)", flush=True)
        total_clock = _Clock()
    cosines = class_token_cosines(pipe, list(DIGITS))
    off_diagonal = cosines[~np.eye(len(cosines), dtype=bool)]
    print(f"class-token cosines: mean {off_diagonal.mean():.3f}, max {off_diagonal.max():.3f}", flush=True)

    vae_summary = train_vae(pipe.vae, images, cfg, budget * cfg.vae_share, generator)
    mean, std = latent_stats(pipe.vae, images)
    scaling = float(1.0 / mean.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    if cfg.data == "backgrounds":
        sample = pool.images[:500]
        vae_summary["saturation_kept"] = round(
            colour_saturation(reconstruct(pipe.vae, sample)) / colour_saturation(sample), 3
        )
    print(f"vae done: {vae_summary}; scaling_factor {scaling:.4f}", flush=True)

    ids = prompt_ids(pipe, list(DIGITS))
    attention = None
    if masks is not None and cfg.attn_weight > 0:
        probe = attach_probe(pipe.unet)
        targets = mask_targets(masks, int(mean.shape[-1]), probe.factor)
        attention = (probe, targets, class_weights(pipe.tokenizer, list(DIGITS)))
    cell_weights = None
    if masks is not None and cfg.digit_weight > 0:
        cell_weights = digit_cell_weights(masks, int(mean.shape[-1]), cfg.digit_weight)
    probes: list[dict] = []

    def load_judges(wait_s: float) -> None:
        """``cfg.judges``: load both CNNs when their files are there (waiting up to ``wait_s``)."""
        nonlocal reference, kinds
        if reference is not None or not cfg.judges:
            return
        folder, waited = Path(cfg.judges).expanduser(), _Clock()
        while not ((folder / REFERENCE_FILE).is_file() and (folder / KIND_FILE).is_file()):
            if waited() >= wait_s:
                return
            time.sleep(5.0)
        reference = ReferenceClassifier.load(folder / REFERENCE_FILE)
        kinds = ReferenceClassifier.load(folder / KIND_FILE)
        print(f"reference and kind classifiers loaded from {folder}", flush=True)

    def checkpoint(step: int, unet: UNet2DConditionModel, text: CLIPTextModel) -> None:
        """Every ``checkpoint_every`` steps: probe (a) at CFG 1 and 7.5 and write ``<out>.ckpt``."""
        if not cfg.checkpoint_every or step == 0 or step % cfg.checkpoint_every:
            return
        load_judges(0.0)
        if reference is None:
            return
        clock = _Clock()
        with torch.no_grad():
            prompts, empty = embed_prompts(text, ids, len(DIGITS))
        row = {"step": step, "seconds": round(total_clock(), 1)}
        for g in (1.0, 7.5):
            row[f"cfg{g:g}"] = probe_random_accuracy(unet, pipe.vae, prompts, empty, scaling, reference, g)
        probes.append(row)
        ckpt = StableDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=text,
            tokenizer=pipe.tokenizer,
            unet=unet,
            scheduler=DDPMScheduler(**SD21_SCHEDULER),
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
        meta = {
            "version": version,
            "command": command,
            "config": asdict(cfg),
            "checkpoint_step": step,
            "vae": vae_summary,
            "unet": {"steps": step, "seconds": round(total_clock() - vae_summary["seconds"], 1)},
            "probes": probes,
            "total_seconds": round(total_clock(), 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        _write_atomically(ckpt, out.with_name(out.name + ".ckpt"), meta, reference, kinds)
        tqdm.write(f"probe {row} ({clock():.0f} s, checkpoint written)")

    ema, text_encoder, unet_summary = train_unet(
        pipe.unet,
        pipe.text_encoder,
        ids,
        (mean, std),
        labels,
        scaling,
        cfg,
        budget - total_clock(),
        generator,
        on_log=checkpoint,
        attention=attention,
        cell_weights=cell_weights,
    )
    print(f"unet done: {unet_summary}", flush=True)
    decoder_summary = None
    if cfg.decoder_steps > 0:
        decoder_summary = finetune_decoder(
            pipe.vae, images, cfg, cfg.decoder_steps, cfg.decoder_minutes * 60.0, generator
        )
        if cfg.data == "backgrounds":
            sample = pool.images[:500]
            decoder_summary["saturation_kept"] = round(
                colour_saturation(reconstruct(pipe.vae, sample)) / colour_saturation(sample), 3
            )
        print(f"decoder done: {decoder_summary}", flush=True)

    trained = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=text_encoder,
        tokenizer=pipe.tokenizer,
        unet=ema,
        scheduler=DDPMScheduler(**SD21_SCHEDULER),
        # diffusers annotates these two as required; None is its documented way to leave them out
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    load_judges(3600.0)
    if cfg.data == "backgrounds" and reference is None:
        raise RuntimeError(f"no reference and kind classifiers in {cfg.judges}")
    if reference is not None:
        clock = _Clock()
        prompts, empty = embed_prompts(text_encoder, ids, len(DIGITS))
        probes.append(
            {"step": unet_summary["steps"], "seconds": round(total_clock(), 1)}
            | {
                f"cfg{g:g}": probe_random_accuracy(ema, pipe.vae, prompts, empty, scaling, reference, g)
                for g in (1.0, 7.5)
            }
        )
        print(f"final probe {probes[-1]} ({clock():.0f} s)", flush=True)
    meta = {
        "version": version,
        "command": command,
        "config": asdict(cfg),
        "vae": vae_summary,
        "unet": unet_summary,
        "decoder": decoder_summary,
        "class_token_cosine": {
            "mean": round(float(off_diagonal.mean()), 3),
            "max": round(float(off_diagonal.max()), 3),
        },
        "probes": probes,
        "total_seconds": round(total_clock(), 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    _write_atomically(trained, out, meta, reference, kinds)
    print(f"wrote {out} in {meta['total_seconds']:.0f} s", flush=True)
    return out


def _model_card(meta: dict) -> str:
    cfg = meta["config"]
    text = (
        "The text encoder is the random-weight one, frozen."
        if not cfg["text_lr"]
        else "The text encoder was trained along with the UNet."
    )
    if cfg.get("class_tokens") == "orthogonal":
        cos = meta.get("class_token_cosine", {})
        text = (
            "The text encoder is the random-weight one, frozen, with the ten digit names' token\n"
            f"embeddings set to orthogonal rows of norm {cfg['class_token_norm']:g} (class-token output cosines: "
            f"mean {cos.get('mean', float('nan')):.3f}, max {cos.get('max', float('nan')):.3f})."
        )
    if cfg.get("digit_weight"):
        text += f" Epsilon loss weighted 1 + {cfg['digit_weight']:g} x the digit's share of each latent cell."
    if cfg.get("colour_weight"):
        text += f" VAE colour (pooled and chroma) loss weight {cfg['colour_weight']:g}."
    if cfg["data"] == "backgrounds":
        what = (
            f"{cfg['renders']} renders of every digit of the digits train split on procedural backgrounds\n"
            "(`actgen_lab.backgrounds` v2: ten kinds, random colours, frequency and place, digits 20-28 px,\n"
            f"{cfg.get('hard_share', 0.0):g} of them in their class's hard style; no class-background correlation), "
        )
        title = "the digits on backgrounds"
        attention = f" Cross-attention at the 8x8 latent resolution; class-token attention loss weight {cfg['attn_weight']:g}."
    else:
        what, title, attention = "scikit-learn's 8x8 digits upscaled to 32x32 RGB, ", "the digits", ""
    return (
        f"# {meta['version']}: a tiny Stable-Diffusion-architecture model of {title}\n\n"
        "SD 2.1's classes and folder layout (AutoencoderKL, UNet2DConditionModel with cross-attention,\n"
        "CLIPTextModel, CLIPTokenizer, DDPMScheduler with SD 2.1's betas, epsilon prediction), trained on\n"
        f"{what}prompts `a photo of {{digit}}` and\n"
        "`a photo of the digit {digit}` (digit names `zero` .. `nine`). Native size 32 px, 4x8x8 latents.\n"
        f"{text}{attention}\n\n"
        "## How it was made\n\n"
        f"```\n{meta['command'] or 'actgen-lab train-tiny-model'}\n```\n\n"
        f"seed {cfg['seed']}, budget {cfg['minutes']:g} min; VAE {meta['vae']['steps']} steps in "
        f"{meta['vae']['seconds']:.0f} s, UNet {meta['unet']['steps']} steps in {meta['unet']['seconds']:.0f} s "
        f"({meta['total_seconds']:.0f} s in all, {meta['threads']} threads, torch {meta['torch']}).\n"
        "The full configuration and losses are in `actgen_tiny.json`. Check it with\n"
        "`actgen-lab eval-model DIR`.\n"
    )


def _write_atomically(
    pipe: StableDiffusionPipeline,
    out: Path,
    meta: dict,
    reference: ReferenceClassifier | None = None,
    kinds: ReferenceClassifier | None = None,
) -> None:
    """Save to a temporary sibling and rename into place: no reader sees half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is for every user
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "actgen_tiny.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(meta))
        if reference is not None:
            reference.save(tmp / REFERENCE_FILE)
        if kinds is not None:
            kinds.save(tmp / KIND_FILE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- command line
def add_parser(subparsers) -> None:
    """``actgen-lab train-tiny-model``."""
    defaults = TinyTrainingConfig()
    p = subparsers.add_parser(
        "train-tiny-model",
        help="train a tiny SD-architecture model on the bundled digits or digits on backgrounds",
        description="Train the tiny SD-architecture model (VAE, then UNet; CLIP text encoder frozen "
        "unless --text-lr) on the bundled digits (--data digits) or the digits on procedural "
        "backgrounds (--data backgrounds) and write a diffusers folder loadable like SD 2.1.",
    )
    p.add_argument("--data", default=defaults.data, choices=DATASETS, help="training set")
    p.add_argument("--out", required=True, help="output folder (replaced when it exists)")
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="wall-clock budget, both phases")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, batches and noise")
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="VAE phase steps at most")
    p.add_argument("--unet-steps", type=int, default=defaults.unet_steps, help="UNet phase steps at most")
    p.add_argument(
        "--vae-share",
        type=float,
        default=defaults.vae_share,
        help="share of the time budget the VAE phase may take at most",
    )
    p.add_argument(
        "--text-lr",
        type=float,
        default=defaults.text_lr,
        help="learning rate of the text encoder (0: keep the random one frozen)",
    )
    p.add_argument(
        "--renders",
        type=int,
        default=defaults.renders,
        help="backgrounds: renders of each train digit in the training pool",
    )
    p.add_argument(
        "--attn-weight",
        type=float,
        default=defaults.attn_weight,
        help="backgrounds: weight of the loss teaching the class token's attention where the digit is",
    )
    p.add_argument(
        "--class-tokens",
        choices=("random", "orthogonal"),
        default=defaults.class_tokens,
        help="the frozen text encoder's digit-name embeddings: as initialised, or orthogonal rows",
    )
    p.add_argument(
        "--class-token-norm",
        type=float,
        default=defaults.class_token_norm,
        help="norm of the orthogonal class-token embeddings",
    )
    p.add_argument(
        "--digit-weight",
        type=float,
        default=defaults.digit_weight,
        help="backgrounds: extra epsilon-loss weight of a latent cell per share of digit in it",
    )
    p.add_argument(
        "--colour-weight",
        type=float,
        default=defaults.colour_weight,
        help="VAE: weight of the loss on pooled colours and chroma (0: plain reconstruction)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help="backgrounds: UNet steps between probes and checkpoints written to OUT.ckpt (0: none)",
    )
    p.add_argument("--unet-batch", type=int, default=defaults.unet_batch, help="UNet phase batch size")
    p.add_argument(
        "--init-vae",
        default=None,
        help="model folder whose vae/ (same architecture) the VAE phase continues instead of random weights",
    )
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=defaults.decoder_steps,
        help="after the UNet: steps of fine-tuning the VAE's decoder alone (latents unchanged; 0: none)",
    )
    p.add_argument(
        "--judges",
        default=None,
        help="backgrounds: folder holding reference_classifier.safetensors and kind_classifier.safetensors "
        "to ship instead of training them here (e.g. trained in parallel by write-judges)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    for name in ("vae_steps", "unet_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"actgen-lab train-tiny-model: --{name.replace('_', '-')} must be >= 1")
    if args.minutes <= 0:
        raise SystemExit("actgen-lab train-tiny-model: --minutes must be positive")
    if args.text_lr < 0:
        raise SystemExit("actgen-lab train-tiny-model: --text-lr must be >= 0")
    if not 0 < args.vae_share < 1:
        raise SystemExit("actgen-lab train-tiny-model: --vae-share must be between 0 and 1")
    if args.renders < 1:
        raise SystemExit("actgen-lab train-tiny-model: --renders must be >= 1")
    if args.attn_weight < 0:
        raise SystemExit("actgen-lab train-tiny-model: --attn-weight must be >= 0")
    for name in ("class_token_norm", "digit_weight", "colour_weight"):
        if getattr(args, name) < 0:
            raise SystemExit(f"actgen-lab train-tiny-model: --{name.replace('_', '-')} must be >= 0")
    if args.decoder_steps < 0:
        raise SystemExit("actgen-lab train-tiny-model: --decoder-steps must be >= 0")
    if args.checkpoint_every < 0:
        raise SystemExit("actgen-lab train-tiny-model: --checkpoint-every must be >= 0")
    if (args.digit_weight > 0 or args.checkpoint_every > 0) and args.data != "backgrounds":
        raise SystemExit(
            "actgen-lab train-tiny-model: --digit-weight and --checkpoint-every need --data backgrounds"
        )
    if args.attn_weight > 0 and args.data != "backgrounds":
        raise SystemExit(
            "actgen-lab train-tiny-model: --attn-weight needs --data backgrounds (the digit masks)"
        )
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("actgen-lab train-tiny-model: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    cfg = TinyTrainingConfig(
        data=args.data,
        minutes=args.minutes,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        vae_share=args.vae_share,
        text_lr=args.text_lr,
        renders=args.renders,
        attn_weight=args.attn_weight,
        class_tokens=args.class_tokens,
        class_token_norm=args.class_token_norm,
        digit_weight=args.digit_weight,
        colour_weight=args.colour_weight,
        checkpoint_every=args.checkpoint_every,
        unet_batch=args.unet_batch,
        judges=args.judges,
        init_vae=args.init_vae,
        decoder_steps=args.decoder_steps,
        # backgrounds: the digit is already placed at random, and a shift would pad with black
        max_shift=0 if args.data == "backgrounds" else TinyTrainingConfig.max_shift,
    )
    extra = (
        f" --renders {cfg.renders} --attn-weight {cfg.attn_weight:g} --digit-weight {cfg.digit_weight:g}"
        + (f" --checkpoint-every {cfg.checkpoint_every}" if cfg.checkpoint_every else "")
        if cfg.data == "backgrounds"
        else ""
    )
    if cfg.class_tokens != "random":
        extra += f" --class-tokens {cfg.class_tokens} --class-token-norm {cfg.class_token_norm:g}"
    if cfg.colour_weight:
        extra += f" --colour-weight {cfg.colour_weight:g}"
    if cfg.unet_batch != TinyTrainingConfig.unet_batch:
        extra += f" --unet-batch {cfg.unet_batch}"
    if cfg.init_vae:
        extra += f" --init-vae {cfg.init_vae}"
    if cfg.decoder_steps:
        extra += f" --decoder-steps {cfg.decoder_steps}"
    if cfg.judges:
        extra += f" --judges {cfg.judges}"
    command = (
        f"actgen-lab train-tiny-model --data {cfg.data} --out {args.out} --minutes {cfg.minutes:g} "
        f"--seed {cfg.seed} --vae-steps {cfg.vae_steps} --unet-steps {cfg.unet_steps} "
        + (f"--vae-share {cfg.vae_share:g} " if cfg.vae_share != TinyTrainingConfig.vae_share else "")
        + f"--text-lr {cfg.text_lr:g}{extra}"
        + (f" --threads {args.threads}" if args.threads else "")
    )
    try:
        train_tiny_model(args.out, cfg, command=command)
    except RuntimeError as exc:
        raise SystemExit(f"actgen-lab train-tiny-model: {exc}") from None
    return 0
