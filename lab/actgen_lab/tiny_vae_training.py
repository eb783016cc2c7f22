"""The tiny models' first phase: the VAE (reconstruction, KL, the colour loss of backgrounds v2)
and the decoder-only phase that fixes colours without moving the latents. See tiny_training."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from actgen_generator.diffusers_classes import (
    AutoencoderKL,
)
from actgen_lab.tiny_recipe import (
    Clock,
    TinyTrainingConfig,
    random_shift,
    schedule_lr,
    to_model_pixels,
)


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
    clock, n = Clock(), len(images)
    bar = tqdm(range(cfg.vae_steps), desc="vae", unit="step", dynamic_ncols=True, mininterval=2.0)
    recon = kl = float("nan")
    done = 0  # steps taken (0 with --vae-steps 0: a VAE continued as it is)
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
        recon, kl, done = float(rec.detach()), float(kl_term.detach()), step + 1
        if step % cfg.log_every == 0:
            bar.set_postfix(recon=f"{recon:.4f}", kl=f"{kl:.2f}")
            tqdm.write(f"vae step {step} recon {recon:.4f} kl {kl:.3f} lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval().requires_grad_(False)
    return {
        "steps": done,
        "seconds": round(clock(), 1),
        "final_recon_loss": recon if done else None,  # None, not NaN: the file stays strict JSON
        "final_kl": kl if done else None,
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
    clock, n, done, recon = Clock(), len(images), 0, float("nan")
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
        recon, done = float(rec.detach()), step + 1
        if step % cfg.log_every == 0:
            tqdm.write(f"decoder step {step} recon {recon:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval().requires_grad_(False)
    return {
        "steps": done,
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
