"""A tiny Stable-Diffusion-architecture pipeline, built from a seed in seconds on a CPU.

Same classes as SD 2.1 base (UNet2DConditionModel with cross-attention, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDPMScheduler with SD 2.1's betas), random weights, saved in
diffusers format, so it loads through exactly the ``from_pretrained`` path a real model does.
It makes the whole system runnable (and testable) without a GPU or a download.

The tokenizer is a real byte-pair tokenizer: its vocabulary holds the 256 byte symbols (with
and without ``</w>``) and, for every word of the prompt template and of the bundled label sets,
the chain of merges that builds that word, so ``a photo of cat`` tokenises to whole words.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from itertools import pairwise
from pathlib import Path
from typing import TypedDict

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from actgen_generator.diffusers_classes import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from actgen_shared.labels import LABEL_SETS, class_names_for

TINY_MODEL_VERSION = "tiny-v1"
PROMPT_WORDS = "a photo of the digit"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77  # CLIP's context length, as in SD 2.1

# Stable Diffusion 2.1 base's noise schedule (docs/architecture.md section 9).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)

TINY_UNET = dict(
    sample_size=16,  # 16x16 latents: 32 px images, CIFAR's size
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2),  # diffusers' name for the number of heads
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=8,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.18215,
)


class TextConfig(TypedDict):
    """The CLIPTextConfig fields the tiny text encoder sets (the token ids come from the tokenizer)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    projection_dim: int


TINY_TEXT = TextConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="gelu",
    projection_dim=32,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _vocabulary_text() -> list[str]:
    """Every text the tiny tokenizer must split into whole words."""
    texts = [PROMPT_WORDS]
    for label_set in sorted(LABEL_SETS):
        texts.extend(class_names_for(label_set))
    return texts


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word: merge the best-ranked adjacent pair until none applies."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(ranks[p], i) for i, p in enumerate(pairwise(symbols)) if p in ranks]
        if not ranked:
            break
        _, i = min(ranked)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges build every known word whole."""
    byte_symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + "</w>" for s in byte_symbols]:
        vocab.setdefault(symbol, len(vocab))
    # The base tokenizer (no merges) gives CLIP's own normalisation and word split.
    base = CLIPTokenizer(vocab={**vocab, BOS: len(vocab), EOS: len(vocab) + 1}, merges=[])
    normalizer = base.backend_tokenizer.normalizer
    pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    words = sorted(
        {
            piece
            for text in _vocabulary_text()
            for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        }
    )
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Add merges at the lowest priority until the word is one symbol; a merge added last
        # only fires when no earlier one applies, so words already whole stay whole.
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    merges = [pair for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    # transformers annotates merges as list[str]; the BPE model it builds takes (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)  # type: ignore[arg-type]


def _check_tokenizer(tokenizer: CLIPTokenizer) -> None:
    text = "a photo of the digit"
    ids = tokenizer(text).input_ids
    if len(ids) != len(text.split()) + 2:
        raise RuntimeError(f"tiny tokenizer split {text!r} into {ids}: merges are wrong")


def build_tiny_pipeline(
    seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None
) -> StableDiffusionPipeline:
    """The tiny pipeline in memory, random weights; the same seed gives the same weights.

    ``unet_config``/``vae_config`` replace the defaults (the trained digits model uses its own).
    """
    tokenizer = build_tokenizer()
    _check_tokenizer(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_TEXT,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        vae = AutoencoderKL(**(vae_config or TINY_VAE))
        unet = UNet2DConditionModel(**(unet_config or TINY_UNET))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SD21_SCHEDULER),
        # diffusers annotates these two as required; None is its documented way to leave them out
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


def tiny_fingerprint(seed: int = 0) -> str:
    """Changes whenever the builder would write other weights: the key of a cached tiny model."""
    spec = {
        "version": TINY_MODEL_VERSION,
        "seed": seed,
        "unet": TINY_UNET,
        "vae": TINY_VAE,
        "text": TINY_TEXT,
        "scheduler": SD21_SCHEDULER,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint_at(folder: Path) -> str | None:
    """The fingerprint of the complete tiny model in ``folder``, None when there is none."""
    try:
        meta = json.loads((folder / "actgen_tiny.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("fingerprint") if (folder / "model_index.json").is_file() else None


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``out_dir`` in diffusers format and return the folder.

    Written to a temporary sibling and renamed into place, so a reader never sees half a model
    and two processes building at once both end with a complete folder (the second keeps the
    first's identical one rather than deleting it under a process loading it).
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "actgen_tiny.json").write_text(
            json.dumps(
                {"version": TINY_MODEL_VERSION, "seed": seed, "fingerprint": tiny_fingerprint(seed)}, indent=2
            )
            + "\n"
        )
        if _fingerprint_at(out) == tiny_fingerprint(seed):  # another process just built the same
            shutil.rmtree(tmp)  # model: keep its folder (it may be loading from it right now)
            return out
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_parser(subparsers) -> None:
    """``actgen-generator build-tiny-model DIR [--seed S]``."""
    parser = subparsers.add_parser("build-tiny-model", help="write the tiny SD-architecture pipeline to DIR")
    parser.add_argument("dir", help="output folder (diffusers format; replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same model)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    if args.seed < 0:
        raise SystemExit(f"actgen-generator build-tiny-model: --seed must be >= 0, got {args.seed}")
    out = build_tiny_model(args.dir, seed=args.seed)
    print(f"tiny model ({TINY_MODEL_VERSION}, seed {args.seed}) written to {out}")
    return 0
