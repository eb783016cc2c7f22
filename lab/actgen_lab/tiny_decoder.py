"""Distil a tiny surrogate decoder for eq. 10 from a tiny model's own VAE, and measure what it changes.

``actgen-lab distil-tiny-decoder --model DIR`` trains an ``AutoencoderTiny`` (TAESD's
architecture, scaled down) to decode what the sampler's eq. 10 decodes: x0_hat at every timestep,
taken from the model's own UNet on noised training latents (with CFG, as the sampler forms it),
and the clean latents themselves. The loss matches the VAE's pixels and, on a small random step
of the latent, the VAE's change of pixels (its Jacobian: eq. 10 uses the decoder's gradient, not
only its image). The result goes to ``DIR/tiny_vae`` (``pipeline.TINY_VAE_DIR``: config.json,
safetensors, and ``actgen_tiny_vae.json`` with the fidelity figures), where the loader finds it
wherever the model folder lives.

Fidelity (:func:`surrogate_fidelity`), on x0_hat at the guided steps of the sampler's schedule:
the cosine between the surrogate's and the VAE's gradient of eq. 10's loss on the latent (per
latent, mean and 10th percentile), and the top-1 agreement of a classifier on the two decodes.
The classifier is a small CNN trained here on the model's training images (the testbed's
``tiny_cnn``), seeded.

Self-contained: imports only the generator and shared packages (docs/architecture.md 5).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from actgen_generator.diffusers_classes import AutoencoderTiny
from actgen_generator.guidance import PosteriorStep, adversarial_loss, cfg_noise, classifier_input
from actgen_generator.pipeline import TINY_VAE_DIR, LoadedModel, load_pipeline
from actgen_shared.architectures import build_classifier
from actgen_shared.presets import RELEASED, prompt_text

META_FILE = "actgen_tiny_vae.json"
MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class DistilConfig:
    """What a distillation runs with (the defaults made models/tiny-digits/tiny_vae)."""

    steps: int = 2000
    budget_s: float = 900.0  # training stops earlier when this is spent
    batch: int = 32
    lr: float = 2e-3
    channels: int = 32  # per decoder block (TAESD: 64)
    blocks: int = 2  # AutoencoderTiny blocks per upsampling level (TAESD: 3); the last level has 1
    pool: int = 2048  # latents decoded by the VAE once, the training set
    jacobian_weight: float = 4.0
    jacobian_eps: float = 0.05  # the random latent step's size, per element
    seed: int = 0


def tiny_config(vae_scale_factor: int, latent_channels: int, cfg: DistilConfig) -> dict[str, Any]:
    """An AutoencoderTiny with one upsampling per factor 2 of the VAE's, reading scaled latents (1.0)."""
    levels = int(round(math.log2(vae_scale_factor))) + 1
    if 2 ** (levels - 1) != vae_scale_factor:
        raise ValueError(f"the VAE's scale factor {vae_scale_factor} is not a power of two")
    return dict(
        decoder_block_out_channels=(cfg.channels,) * levels,
        num_decoder_blocks=(cfg.blocks,) * (levels - 1) + (1,),
        encoder_block_out_channels=(8,) * levels,  # unused (eq. 10 decodes only); the smallest that builds
        num_encoder_blocks=(1,) * levels,
        latent_channels=latent_channels,
        scaling_factor=1.0,  # decodes the sampler's latents as they are, like TAESD
    )


def _training_images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels the tiny model was trained on (its actgen_tiny.json says which set)."""
    from actgen_lab.model_eval import model_data

    if model_data(str(folder)) == "backgrounds":
        from actgen_lab.backgrounds import load_backgrounds_split

        train = load_backgrounds_split().train
        return train.images, train.labels
    from actgen_shared.digits import load_digits_split

    split = load_digits_split()
    return split.train_images, split.train_labels


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def x0_pool(
    model: LoadedModel, images: np.ndarray, labels: np.ndarray, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` latents as eq. 10 meets them, (scaled latents, labels): x0_hat of the UNet under CFG
    (scale 1 to 15) at timesteps drawn uniformly, a quarter the clean latents themselves."""
    from actgen_shared.labels import DIGITS

    pipe = model.pipe
    scaling = float(pipe.vae.config.scaling_factor)
    idx = torch.randint(0, len(images), (n,), generator=generator)
    pix = _pixels(images[idx.numpy()])
    z = torch.cat([pipe.vae.encode(pix[i : i + 256]).latent_dist.mean for i in range(0, n, 256)]) * scaling
    classes = torch.from_numpy(labels[idx.numpy()]).long()
    prompts = [prompt_text(RELEASED["prompt"], DIGITS[int(c)]) for c in range(10)]
    cond_all, _ = pipe.encode_prompt(prompts, model.device, 1, False)
    uncond, _ = pipe.encode_prompt([""], model.device, 1, False)
    sched = pipe.scheduler
    alphas = sched.alphas_cumprod
    out = z.clone()
    for i in range(n // 4, n, 256):  # the first quarter stays clean
        j = min(n, i + 256)
        b = j - i
        t = torch.randint(0, len(alphas), (b,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        eps = torch.randn(z[i:j].shape, generator=generator)
        x_t = a.sqrt() * z[i:j] + (1 - a).sqrt() * eps
        cond = cond_all[classes[i:j]]
        e_c = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        e_u = pipe.unet(x_t, t, encoder_hidden_states=uncond.expand_as(cond)).sample
        scale = 1.0 + 14.0 * torch.rand(b, 1, 1, 1, generator=generator)
        eps_hat = cfg_noise(e_u, e_c, scale)  # type: ignore[arg-type]  # per-row scale broadcasts
        out[i:j] = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    return out, classes


def distil(model: LoadedModel, folder: Path, cfg: DistilConfig) -> tuple[AutoencoderTiny, dict[str, Any]]:
    """Train the surrogate decoder on the model's x0_hat pool; returns it (eval) and a summary."""
    started = time.monotonic()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    pipe = model.pipe
    scaling = float(pipe.vae.config.scaling_factor)
    images, labels = _training_images(folder)
    latents, _ = x0_pool(model, images, labels, cfg.pool, g)
    # the VAE's pixels, and its change along one fixed random latent step per latent (the Jacobian)
    steps_dz = cfg.jacobian_eps * torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        targets = torch.cat(
            [pipe.vae.decode(latents[i : i + 256] / scaling).sample for i in range(0, len(latents), 256)]
        )
        moved = torch.cat(
            [
                pipe.vae.decode((latents[i : i + 256] + steps_dz[i : i + 256]) / scaling).sample
                for i in range(0, len(latents), 256)
            ]
        )
    targets_d = moved - targets
    tiny = AutoencoderTiny(
        **tiny_config(int(pipe.vae_scale_factor), int(pipe.vae.config.latent_channels), cfg)
    )
    tiny.train()
    pool_s = time.monotonic() - started
    started = time.monotonic()  # the budget is the training's: the pool took what it took
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, loss_pix, loss_jac = 0, math.nan, math.nan
    for step in range(cfg.steps):
        if time.monotonic() - started > cfg.budget_s:
            break
        progress = max(step / cfg.steps, (time.monotonic() - started) / cfg.budget_s)  # steps or time
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=g)
        z, target = latents[idx], targets[idx]
        out = tiny.decode(z).sample
        pix = F.mse_loss(out, target) + F.l1_loss(out, target)
        loss = pix
        if cfg.jacobian_weight > 0:  # the change of pixels along the latent's step: the Jacobian
            out_d = tiny.decode(z + steps_dz[idx]).sample - out
            jac = F.mse_loss(out_d, targets_d[idx]) / cfg.jacobian_eps**2
            loss = pix + cfg.jacobian_weight * jac
            loss_jac = float(jac.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_pix = float(pix.detach())
        if step % 250 == 0:
            print(f"distil step {step} pixel loss {loss_pix:.4f} jacobian {loss_jac:.4f}", flush=True)
    tiny.eval().requires_grad_(False)
    return tiny, {
        "steps": step + 1,
        "seconds": round(time.monotonic() - started, 1),
        "pool_seconds": round(pool_s, 1),
        "final_pixel_loss": loss_pix,
        "final_jacobian_loss": loss_jac,
        "config": asdict(cfg),
    }


def probe_classifier(folder: Path, size: int, seed: int = 0, epochs: int = 8) -> torch.nn.Module:
    """A small CNN (``tiny_cnn``) trained on the model's training images: the fidelity measurement's."""
    images, labels = _training_images(folder)
    torch.manual_seed(seed)
    net = build_classifier("tiny_cnn", int(labels.max()) + 1)
    x = _pixels(images)
    x = classifier_input(x, size, *MEAN_STD)
    y = torch.from_numpy(labels).long()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = order[i : i + 64]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def surrogate_fidelity(
    model: LoadedModel,
    classifier: torch.nn.Module,
    input_size: int,
    n: int = 256,
    seed: int = 1,
    latents: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Eq. 10 through the tiny decoder against the VAE on the same latents (x0_hat of the model).

    ``grad_cosine_*``: cosine between d L_adv / d latent through each decoder, per latent;
    ``top1_agreement``: share of latents the classifier puts in the same class on both decodes;
    ``pixel_mean_abs_diff``: the decodes' mean |difference| (0..255).
    """
    if model.tiny_vae is None:
        raise ValueError(f"{model.model_id} has no tiny decoder ({TINY_VAE_DIR}/)")
    pipe = model.pipe
    if latents is None or labels is None:
        raise ValueError("surrogate_fidelity needs latents and their labels")
    scales = {
        "vae": float(pipe.vae.config.scaling_factor),
        "tiny": float(model.tiny_vae.config["scaling_factor"]),
    }
    decoders = {"vae": pipe.vae, "tiny": model.tiny_vae}
    grads, preds, pixels = {}, {}, {}
    for name, decoder in decoders.items():
        z = latents.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            image = decoder.decode(z / scales[name]).sample
            logits = classifier(classifier_input(image, input_size, *MEAN_STD))
            loss = adversarial_loss(logits, labels).sum()
            (grads[name],) = torch.autograd.grad(loss, z)
        preds[name] = logits.argmax(1)
        pixels[name] = ((image.detach() / 2 + 0.5).clamp(0, 1) * 255).round()
    cos = F.cosine_similarity(grads["tiny"].flatten(1), grads["vae"].flatten(1), dim=1)
    return {
        "latents": len(latents),
        "grad_cosine_mean": float(cos.mean()),
        "grad_cosine_p10": float(cos.quantile(0.1)),
        "top1_agreement": float((preds["tiny"] == preds["vae"]).float().mean()),
        "pixel_mean_abs_diff": float((pixels["tiny"] - pixels["vae"]).abs().mean()),
        "classifier_accuracy_vae": float((preds["vae"] == labels).float().mean()),
    }


def guided_latents(
    model: LoadedModel, folder: Path, n: int, seed: int, steps: int = 40, grad_steps: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_hat as the sampler forms it at its guided steps: noised clean latents at the first
    ``grad_steps`` of ``steps`` DDPM timesteps, through the UNet with the released CFG scale."""
    from actgen_generator.diffusers_classes import DDPMScheduler
    from actgen_shared.labels import DIGITS

    pipe = model.pipe
    g = torch.Generator().manual_seed(seed)
    images, labels = _training_images(folder)
    idx = torch.randint(0, len(images), (n,), generator=g)
    scaling = float(pipe.vae.config.scaling_factor)
    with torch.no_grad():
        z = pipe.vae.encode(_pixels(images[idx.numpy()])).latent_dist.mean * scaling
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        chosen = sched.timesteps[:grad_steps][torch.randint(0, grad_steps, (n,), generator=g)]
        classes = torch.from_numpy(labels[idx.numpy()]).long()
        prompts = [prompt_text(RELEASED["prompt"], DIGITS[int(c)]) for c in range(10)]
        cond_all, _ = pipe.encode_prompt(prompts, model.device, 1, False)
        uncond, _ = pipe.encode_prompt([""], model.device, 1, False)
        out = torch.empty_like(z)
        for k, t in enumerate(chosen.tolist()):
            post = PosteriorStep.at(sched, t)
            a = post.alpha_bar
            x_t = math.sqrt(a) * z[k : k + 1] + math.sqrt(1 - a) * torch.randn(
                z[k : k + 1].shape, generator=g
            )
            tt = torch.tensor([t])
            e_c = pipe.unet(x_t, tt, encoder_hidden_states=cond_all[classes[k : k + 1]]).sample
            e_u = pipe.unet(x_t, tt, encoder_hidden_states=uncond).sample
            out[k : k + 1] = post.predict_x0(x_t, cfg_noise(e_u, e_c, RELEASED["guidance_scale"]))
    return out, classes


def save_tiny_vae(tiny: AutoencoderTiny, target: Path, meta: dict[str, Any]) -> Path:
    """Write the decoder folder whole or not at all (a temporary folder renamed into place)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def distil_command(folder: Path, cfg: DistilConfig, fidelity_n: int, command: str) -> dict[str, Any]:
    """Distil, save into ``folder/tiny_vae``, reload the model with it and measure its fidelity."""
    torch.set_grad_enabled(True)
    model = load_pipeline(str(folder), device="cpu", dtype="float32")
    tiny, summary = distil(model, folder, cfg)
    model.tiny_vae = tiny
    size = int(model.native_size)
    classifier = probe_classifier(folder, size, seed=cfg.seed)
    latents, labels = guided_latents(model, folder, fidelity_n, seed=cfg.seed + 1)
    fidelity = surrogate_fidelity(model, classifier, size, latents=latents, labels=labels)
    meta = {"command": command, "distillation": summary, "fidelity": fidelity}
    save_tiny_vae(tiny, folder / TINY_VAE_DIR, meta)
    return meta


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``actgen-lab distil-tiny-decoder --model DIR [--steps N] [--budget-s S] [--seed K]``."""
    parser = subparsers.add_parser(
        "distil-tiny-decoder",
        help="distil eq. 10's tiny surrogate decoder from a tiny model's VAE into DIR/tiny_vae",
        description="Train an AutoencoderTiny to decode the model's x0_hat as its VAE does (pixels and "
        "Jacobian), write it to DIR/tiny_vae, and report the cosine of eq. 10's latent gradients "
        "through it and the VAE, and a classifier's top-1 agreement on the two decodes.",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="a tiny model folder (models/tiny-digits)"
    )
    parser.add_argument("--steps", type=int, default=DistilConfig.steps)
    parser.add_argument("--budget-s", type=float, default=DistilConfig.budget_s, help="wall-clock limit")
    parser.add_argument("--seed", type=int, default=DistilConfig.seed)
    parser.add_argument(
        "--jacobian-weight",
        type=float,
        default=DistilConfig.jacobian_weight,
        help="weight of matching the VAE's change of pixels along a latent step (its Jacobian)",
    )
    parser.add_argument(
        "--fidelity-latents", type=int, default=256, help="latents the fidelity is measured on"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.model).expanduser()
    if not (folder / "model_index.json").is_file() or not (folder / "vae").is_dir():
        print(
            f"actgen-lab distil-tiny-decoder: error: --model {folder} is not a diffusers model folder",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1 or args.budget_s <= 0 or args.fidelity_latents < 2:
        print(
            "actgen-lab distil-tiny-decoder: error: --steps >= 1, --budget-s > 0 and "
            "--fidelity-latents >= 2 are needed",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DistilConfig(
        steps=args.steps, budget_s=args.budget_s, seed=args.seed, jacobian_weight=args.jacobian_weight
    )
    command = " ".join(["actgen-lab", *sys.argv[1:]]) if sys.argv[1:] else "distil-tiny-decoder"
    meta = distil_command(folder, cfg, args.fidelity_latents, command)
    f = meta["fidelity"]
    print(
        f"{folder / TINY_VAE_DIR}: {meta['distillation']['steps']} steps in {meta['distillation']['seconds']} s; "
        f"gradient cosine mean {f['grad_cosine_mean']:.3f} (p10 {f['grad_cosine_p10']:.3f}), top-1 agreement "
        f"{f['top1_agreement']:.3f}, pixel |diff| {f['pixel_mean_abs_diff']:.1f}/255"
    )
    return 0


__all__ = [
    "DistilConfig",
    "add_parser",
    "distil",
    "guided_latents",
    "probe_classifier",
    "surrogate_fidelity",
    "tiny_config",
]
