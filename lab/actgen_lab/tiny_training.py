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
(8x8, so eq. 8's mask has 8x8 cells of 4 px, not the 4x4 of the digits model; ``--latent-side 16``:
16x16 latents and 2 px cells, v5). ``attn_weight`` > 0
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

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from actgen_generator.diffusers_classes import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from actgen_generator.tiny_model import SD21_SCHEDULER
from actgen_lab.backgrounds import REFERENCE_FILE, ReferenceClassifier, broad_scenes
from actgen_lab.tiny_recipe import (
    DATASETS,
    LATENT_SIDES,
    VERSIONS,
    Clock,
    TinyTrainingConfig,
    build_untrained,
    class_token_cosines,
    class_weights,
    embed_prompts,
    load_digits_split,
    prompt_ids,
    to_model_pixels,
)
from actgen_lab.tiny_unet_training import (
    KIND_FILE,
    attach_probe,
    digit_cell_weights,
    mask_targets,
    probe_random_accuracy,
    train_digit_classifier,
    train_kind_classifier,
    train_unet,
)
from actgen_lab.tiny_vae_training import (
    colour_saturation,
    finetune_decoder,
    latent_stats,
    reconstruct,
    train_vae,
)
from actgen_shared.labels import DIGITS


def train_tiny_model(out_dir: str | Path, cfg: TinyTrainingConfig, command: str | None = None) -> Path:
    """Train on ``cfg.data`` and write a diffusers folder (plus ``actgen_tiny.json``, README.md) to ``out_dir``."""
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown training data {cfg.data!r}; known: {list(DATASETS)}")
    if cfg.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {cfg.minutes}")
    out = Path(out_dir).expanduser().resolve()
    total_clock = Clock()
    budget = cfg.minutes * 60.0
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    version = VERSIONS[cfg.data]
    if cfg.pooled_text and cfg.data == "backgrounds":
        # v3: v2's VAE and data, the prompt also in the time embedding; v4: v3's UNet on a VAE
        # trained further (v2's kept two thirds of the colour and lost the background patterns)
        version = "tiny-backgrounds-v4" if cfg.vae_steps else "tiny-backgrounds-v3"
    if cfg.latent_side == 16:  # v5: v4's recipe on a 16x16 latent grid (a new VAE and UNet)
        version = "tiny-backgrounds-v5"
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
    pipe = build_untrained(
        cfg.seed, cfg.data, cfg.class_tokens, cfg.class_token_norm, cfg.pooled_text, cfg.latent_side
    )
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
    # else (backgrounds): both judges train here on the VAE's images, the digit judge after the VAE
    # phase (the UNet's probes read with it), the kind judge at the end; neither counts in the budget
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
    if cfg.data == "backgrounds" and not cfg.judges:  # the digit judge reads the VAE's images
        clock = Clock()
        reference = train_digit_classifier(vae=pipe.vae)
        seconds = clock()
        budget += seconds  # outside the budget, as the judges trained elsewhere (--judges) are
        print(f"reference classifier trained in {seconds:.0f} s (outside the budget)", flush=True)

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
        folder, waited = Path(cfg.judges).expanduser(), Clock()
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
        clock = Clock()
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
    if cfg.data == "backgrounds" and kinds is None and reference is not None:  # trained here, not --judges
        if decoder_summary is not None:  # the decoder moved since the digit judge learnt its images
            reference = train_digit_classifier(vae=pipe.vae)
        kinds = train_kind_classifier(vae=pipe.vae)
    if cfg.data == "backgrounds" and reference is None:
        raise RuntimeError(f"no reference and kind classifiers in {cfg.judges}")
    if reference is not None:
        clock = Clock()
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
    side = cfg.get("latent_side", 8)
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
            "(`actgen_lab.backgrounds.broad_scenes`: ten kinds, random colours, frequency and place, digits 20-28 px,\n"
            f"{cfg.get('hard_share', 0.0):g} of them in their class's hard style; no class-background correlation), "
        )
        title = "the digits on backgrounds"
        attention = (
            f" Cross-attention at the {side}x{side} latent resolution; class-token attention loss weight"
            f" {cfg['attn_weight']:g}."
        )
        if cfg.get("pooled_text"):
            attention += (
                " The prompt, attention-pooled, is also added to the UNet's time embedding (`--pooled-text`)."
            )
    else:
        what, title, attention = "scikit-learn's 8x8 digits upscaled to 32x32 RGB, ", "the digits", ""
    return (
        f"# {meta['version']}: a tiny Stable-Diffusion-architecture model of {title}\n\n"
        "SD 2.1's classes and folder layout (AutoencoderKL, UNet2DConditionModel with cross-attention,\n"
        "CLIPTextModel, CLIPTokenizer, DDPMScheduler with SD 2.1's betas, epsilon prediction), trained on\n"
        f"{what}prompts `a photo of {{digit}}` and\n"
        "`a photo of the digit {digit}` (digit names `zero` .. `nine`). Native size 32 px, "
        f"4x{side}x{side} latents.\n"
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
        "--pooled-text",
        action="store_true",
        help="the UNet also adds the attention-pooled prompt to its time embedding (diffusers' "
        "addition_embed_type text): the class conditions every block, not only the cross-attention",
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
    p.add_argument(
        "--latent-side",
        type=int,
        choices=LATENT_SIDES,
        default=defaults.latent_side,
        help="the latent grid: 8 (32 px / 4) or, --data backgrounds only, 16 (32 px / 2: eq. 8's mask "
        "at 2 px cells; a new VAE and a three-level UNet)",
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
    if args.unet_steps < 1:
        raise SystemExit("actgen-lab train-tiny-model: --unet-steps must be >= 1")
    if args.vae_steps < (0 if args.init_vae else 1):  # 0: the --init-vae VAE as it is
        raise SystemExit(
            "actgen-lab train-tiny-model: --vae-steps must be >= 1 (>= 0 with --init-vae: keep that VAE)"
        )
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
    if args.latent_side != TinyTrainingConfig.latent_side and args.data != "backgrounds":
        raise SystemExit("actgen-lab train-tiny-model: --latent-side 16 needs --data backgrounds")
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
        pooled_text=args.pooled_text,
        digit_weight=args.digit_weight,
        colour_weight=args.colour_weight,
        checkpoint_every=args.checkpoint_every,
        unet_batch=args.unet_batch,
        latent_side=args.latent_side,
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
    if cfg.pooled_text:
        extra += " --pooled-text"
    if cfg.colour_weight:
        extra += f" --colour-weight {cfg.colour_weight:g}"
    if cfg.latent_side != TinyTrainingConfig.latent_side:
        extra += f" --latent-side {cfg.latent_side}"
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
