"""How a guide of another aspect than the generation size is fit to it (option ``guide_fit``).

Image guidance (eq. 6) pulls the sample towards the guide's latent, so a squashed guide would
teach the generator squashed objects. ``crop`` (the default) keeps the centre of the guide at
its own aspect, ``pad`` keeps all of it and adds mid-grey borders (zero once in the VAE's
[-1, 1] range), ``stretch`` resizes it to the generation size regardless of its aspect.

The geometry is one pure function (:func:`fit_plan`); the sampler applies it to tensors, the
echo sampler to PIL images, so both fit a guide the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from actgen_shared.schemas import GuideFit

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

PAD_VALUE = 0.5  # mid-grey in [0, 1]: 0 in the VAE's [-1, 1] input
PAD_RGB = (128, 128, 128)  # the same grey as 8-bit RGB


@dataclass(frozen=True)
class FitPlan:
    """Crop the source to ``crop``, resize that to ``size``, then add ``pad`` borders."""

    crop: tuple[int, int, int, int]  # top, left, height, width of the part of the source kept
    size: tuple[int, int]  # (height, width) the kept part is resized to
    pad: tuple[int, int, int, int]  # top, bottom, left, right borders added after the resize


def fit_plan(src_h: int, src_w: int, dst_h: int, dst_w: int, fit: GuideFit) -> FitPlan:
    """The crop, resize and padding that take a src_h x src_w guide to dst_h x dst_w."""
    whole = (0, 0, src_h, src_w)
    none = (0, 0, 0, 0)
    if fit == "stretch" or src_h * dst_w == src_w * dst_h:  # same aspect: a plain resize
        return FitPlan(whole, (dst_h, dst_w), none)
    if fit == "crop":  # the largest centred window of the target's aspect
        if src_w * dst_h > src_h * dst_w:  # wider than the target: drop columns on both sides
            w = max(1, round(src_h * dst_w / dst_h))
            return FitPlan((0, (src_w - w) // 2, src_h, w), (dst_h, dst_w), none)
        h = max(1, round(src_w * dst_h / dst_w))  # taller: drop rows above and below
        return FitPlan(((src_h - h) // 2, 0, h, src_w), (dst_h, dst_w), none)
    # pad: the whole guide scaled to fit inside, centred, the rest borders
    scale = min(dst_h / src_h, dst_w / src_w)
    h = min(dst_h, max(1, round(src_h * scale)))
    w = min(dst_w, max(1, round(src_w * scale)))
    top, left = (dst_h - h) // 2, (dst_w - w) // 2
    return FitPlan(whole, (h, w), (top, dst_h - h - top, left, dst_w - w - left))


def fit_guide(image: torch.Tensor, height: int, width: int, fit: GuideFit) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, height, width), fit as ``fit`` says."""
    import torch.nn.functional as F

    plan = fit_plan(image.shape[-2], image.shape[-1], height, width, fit)
    top, left, h, w = plan.crop
    image = image[..., top : top + h, left : left + w]
    if tuple(image.shape[-2:]) != plan.size:
        image = F.interpolate(image, size=plan.size, mode="bilinear", align_corners=False, antialias=True)
    if any(plan.pad):
        pad_top, pad_bottom, pad_left, pad_right = plan.pad
        image = F.pad(image, (pad_left, pad_right, pad_top, pad_bottom), value=PAD_VALUE)
    return image


def fit_guide_image(image: Image.Image, height: int, width: int, fit: GuideFit) -> Image.Image:
    """The same fit on a PIL image (the echo sampler), ``height`` x ``width`` out."""
    from PIL import Image

    plan = fit_plan(image.height, image.width, height, width, fit)
    top, left, h, w = plan.crop
    image = image.crop((left, top, left + w, top + h))
    if (image.height, image.width) != plan.size:
        image = image.resize((plan.size[1], plan.size[0]), Image.Resampling.BILINEAR)
    if any(plan.pad):
        canvas = Image.new(image.mode, (width, height), PAD_RGB)
        canvas.paste(image, (plan.pad[2], plan.pad[0]))
        image = canvas
    return image
