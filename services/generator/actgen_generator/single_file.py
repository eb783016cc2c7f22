"""Load one Stable Diffusion checkpoint file (``.safetensors`` or ``.ckpt``) with nothing downloaded.

A single file (``v2-1_512-ema-pruned.safetensors``) holds the UNet, VAE and text encoder weights in
the original LDM layout but no configuration and no tokenizer. diffusers' ``from_single_file``
converts the weights; the configuration comes from :data:`SD21_CONFIG_DIR` (SD 2.1 base's JSON
files, shipped in this package) and the tokenizer from CLIP's byte-pair merges shipped beside them
(``sd21_base/NOTICE.md``), so loading works with ``HF_HUB_OFFLINE=1``. A ``.ckpt`` is read with
``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from actgen_generator.diffusers_classes import StableDiffusionPipeline
from actgen_generator.tiny_model import BOS, EOS, MAX_TOKENS, _bytes_to_unicode

SD21_CONFIG_DIR = Path(__file__).with_name("sd21_base")
SD21_PAD_TOKEN = "!"  # SD 2.x pads prompts with "!" (id 0), not with <|endoftext|> as SD 1.x does
CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size less the byte symbols and the two specials


@cache
def _sd21_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, derived from the shipped merges as CLIP derives them."""
    lines = gzip.decompress((SD21_CONFIG_DIR / "tokenizer" / "merges.txt.gz").read_bytes()).decode()
    pairs = [line.split() for line in lines.splitlines()[1:] if line]  # line 0: "#version: 0.2"
    if len(pairs) != CLIP_MERGES or any(len(p) != 2 for p in pairs):
        raise RuntimeError(f"{SD21_CONFIG_DIR}/tokenizer/merges.txt.gz is not CLIP's merge list")
    merges = tuple((a, b) for a, b in pairs)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def sd21_tokenizer() -> CLIPTokenizer:
    """SD 2.1 base's CLIPTokenizer (49,408 tokens, pad "!"), built from the package alone."""
    vocab, merges = _sd21_vocabulary()
    # transformers annotates merges as list[str]; the BPE model it builds takes (left, right) pairs
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]
        pad_token=SD21_PAD_TOKEN,
        model_max_length=MAX_TOKENS,
    )


def load_single_file(
    path: str | Path, dtype: torch.dtype, config_dir: str | Path | None = None
) -> StableDiffusionPipeline:
    """The pipeline of checkpoint ``path``; ``config_dir`` (a diffusers folder's configs) defaults to SD 2.1 base's.

    A ``config_dir`` with its own ``tokenizer/vocab.json`` gives the tokenizer too; otherwise it is
    :func:`sd21_tokenizer`.
    """
    config = Path(config_dir) if config_dir is not None else SD21_CONFIG_DIR
    if (config / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(config / "tokenizer")
    else:
        tokenizer = sd21_tokenizer()
    return StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        dtype=dtype,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


__all__ = ["SD21_CONFIG_DIR", "load_single_file", "sd21_tokenizer"]
