"""The equations of ActGen's guidance as small pure functions (paper sections 3.2, 4.2, 4.3, A.3).

The sampler's step loop calls exactly these, and the tests check each against a reference, so
what is tested is what runs. Tensors are batched: one row per item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


def cfg_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, eq. 4: eps(x, 0) + s (eps(x, c) - eps(x, 0))."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class PosteriorStep:
    """Coefficients of one DDPM step from timestep t to the previous one (eq. 3, 5).

    ``x_prev = x0_coef * x0 + xt_coef * x_t + sigma * z``, the posterior q(x_{t-1} | x_t, x0)
    with fixed-small variance; the x0 form of eq. 5 (same value for x0 = x0_hat(eps)).
    """

    alpha_bar: float
    x0_coef: float
    xt_coef: float
    sigma: float
    prediction_type: str = "epsilon"

    @classmethod
    def at(cls, scheduler, timestep: int) -> PosteriorStep:
        """Coefficients of a diffusers DDPMScheduler (after ``set_timesteps``) at ``timestep``."""
        t = int(timestep)
        prev = int(scheduler.previous_timestep(t))
        alpha_bar = float(scheduler.alphas_cumprod[t])
        alpha_bar_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.one)
        beta_t = 1.0 - alpha_bar / alpha_bar_prev
        variance_type = scheduler.config.variance_type
        if variance_type == "fixed_small":
            variance = max((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta_t, 1e-20)
        elif variance_type == "fixed_large":
            variance = beta_t
        else:
            raise ValueError(
                f"scheduler variance_type {variance_type!r} is not supported (fixed_small, fixed_large)"
            )
        return cls(
            alpha_bar=alpha_bar,
            x0_coef=math.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar),
            xt_coef=math.sqrt(1.0 - beta_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
            sigma=math.sqrt(variance) if t > 0 else 0.0,
            prediction_type=scheduler.config.prediction_type,
        )

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Predicted clean latent x0_hat from the model output (inverse of eq. 2)."""
        a = self.alpha_bar
        if self.prediction_type == "epsilon":
            return (x_t - math.sqrt(1.0 - a) * model_output) / math.sqrt(a)
        if self.prediction_type == "v_prediction":
            return math.sqrt(a) * x_t - math.sqrt(1.0 - a) * model_output
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def step(self, x0: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_{t-1} from x0 and x_t with noise z (eq. 5; eq. 6 with x0 := guide latent)."""
        return self.x0_coef * x0 + self.xt_coef * x_t + self.sigma * z


def gamma(step: int, strength: torch.Tensor | float) -> torch.Tensor | float:
    """Image guidance scale of eq. 7: 1 - sigmoid(step - i), step = 0 .. steps-1.

    Computed as sigmoid(i - step), the same value without float32 cancellation near 0.
    """
    if isinstance(strength, torch.Tensor):
        return torch.sigmoid(strength.double() - step).to(strength.dtype)
    return 1.0 / (1.0 + math.exp(step - strength))


def gamma_midpoint(strength: float, steps: int, reference_steps: int | None) -> float:
    """The i of eq. 7 for a run of ``steps`` steps, when ``strength`` is stated for ``reference_steps``.

    gamma's midpoint is a step index, so a strength stated for the paper's 40 steps (section 5.1:
    i = 12.5) keeps its place in the schedule at other step counts: i * steps / reference (6.25
    of 20). ``reference_steps`` None: i as given. (The released code runs 40 steps only.)
    """
    if reference_steps is None:
        return strength
    return strength * steps / reference_steps


def image_guidance(
    x: torch.Tensor, x_guide: torch.Tensor, gamma_k: torch.Tensor, mask: torch.Tensor | float
) -> torch.Tensor:
    """Eq. 8: x + m * gamma (x^g - x). gamma_k is per item (batch,); mask (batch, 1, h, w) or 1."""
    return x + mask * gamma_k.view(-1, 1, 1, 1) * (x_guide - x)


def fewshot_strength(confidence: float, u: float, L: float = 30.0, k: float = 10.0, p: float = 5.0) -> float:
    """Appendix A.3: image guidance strength from the guide's confidence f, L/(1+e^{k(f-u)}) + p."""
    z = k * (confidence - u)
    if z > 700.0:  # exp overflows; the limit is p
        return p
    return L / (1.0 + math.exp(z)) + p


def contrastive_loss(
    x0: torch.Tensor, bank: torch.Tensor, valid: torch.Tensor, margin: float
) -> torch.Tensor:
    """Eq. 9 per item: mean over its bank latents of max(rho - ||x0 - B_i||_2, 0).

    ``x0`` (batch, C, h, w); ``bank`` (batch, N, C*h*w) padded per item; ``valid`` (batch, N)
    marks real entries. An item with no bank latents has loss 0.
    """
    flat = x0.flatten(1).float()
    # ||x - b||^2 = |x|^2 + |b|^2 - 2 x.b, one batched matmul instead of an (N, D) difference.
    sq = (
        (flat * flat).sum(1, keepdim=True)
        + (bank * bank).sum(2)
        - 2.0 * torch.bmm(bank, flat.unsqueeze(2)).squeeze(2)
    )
    dist = sq.clamp(min=1e-12).sqrt()
    hinge = (margin - dist).clamp(min=0.0) * valid
    return hinge.sum(1) / valid.sum(1).clamp(min=1.0)


def adversarial_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 10 per item: the negative cross-entropy of the classifier on the decoded image."""
    return -F.cross_entropy(logits.float(), labels, reduction="none")


def classifier_input(
    images: torch.Tensor, size: int, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """VAE output in [-1, 1] -> the classifier's input: [0, 1], resized, normalised."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # per channel with Python floats: a (1, 3, 1, 1) tensor made for it would be a blocking copy to a GPU
    return torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)


def classifier_size_latents(latents: torch.Tensor, input_size: int, vae_scale_factor: int) -> torch.Tensor:
    """Shrink latents so that their decode is about the classifier's input size (eq. 10's cheap decode).

    ``ceil(input_size / vae_scale_factor)`` on a side, bilinear with antialiasing; latents already
    that small or smaller are returned as they are.
    """
    side = max(1, math.ceil(input_size / vae_scale_factor))
    if side >= min(latents.shape[-2:]):
        return latents
    return F.interpolate(latents, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def normalized_update(
    embeds: torch.Tensor, grad: torch.Tensor, lr: float, norm: Literal["token", "global"] = "token"
) -> torch.Tensor:
    """Eq. 11 per item: e - nu * grad / ||grad||, for embeddings shaped (batch, tokens, D).

    ``global`` (the paper's text): the norm over each item's whole embedding, so it moves by nu.
    ``token`` (the released code's ``F.normalize(grad)`` on (2, 77, D), i.e. dim 1): each channel
    normalised over the tokens, so each embedding moves by nu * sqrt(D). A zero gradient (no bank
    latent within the margin, not adversarial) leaves the item where it is, in both. A non-finite
    gradient gives a non-finite result: the sampler skips that item's move (loss_scale.py).
    """
    if norm == "token":
        step = F.normalize(grad.float(), dim=1, eps=1e-30)
    elif norm == "global":
        size = grad.float().flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        step = grad.float() / size.clamp(min=1e-30)
    else:
        raise ValueError(f"unknown grad_norm {norm!r} (token, global)")
    return embeds - lr * step.to(embeds.dtype)
