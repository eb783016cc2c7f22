"""Hard samples as guide images: whatever a training loop holds, as the PNG bytes a job carries.

A loop holds its hard samples as torch tensors (CHW, float in [0, 1] or uint8, or normalised with
a mean and std), a batch of them (NCHW), PIL images, uint8 arrays (HxWx3 or HxW) or encoded
PNG/JPEG bytes; :func:`guide_pngs` turns any of these into PNGs, and says which item is wrong
when one cannot be. torch is never imported here: a tensor is recognised by its methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from actgen_shared.codecs import png_encode

MAX_GUIDE_SIDE = 512  # guides larger than this are shrunk before posting (the sampler's native size)
# a float image this far outside [0, 1] was normalised, and needs the mean/std to be shown
RANGE_SLACK = 0.01


class GuideError(ValueError):
    """A hard sample that cannot be a guide image; the message names the item."""


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy")


def _split_batch(images: Any) -> list[Any]:
    """A batch (NCHW tensor, NxHxWxC array) as a list of items; a sequence stays as it is."""
    if _is_tensor(images) or isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise GuideError(
                f"a batch of images must be 4-dimensional (N,C,H,W), got shape {tuple(images.shape)}"
            )
        return list(images)
    if isinstance(images, (bytes, Image.Image)):
        raise GuideError("images must be a batch or a sequence of images, got a single image")
    return list(images)


def _chw_to_uint8(
    array: np.ndarray, k: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """CxHxW (float in [0, 1], normalised float, or uint8) -> HxWx3 (or HxW) uint8."""
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise GuideError(f"images[{k}] must be C x H x W with 1 or 3 channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        pixels = array
    else:
        array = array.astype(np.float32)
        if mean is not None and std is not None:
            channels = array.shape[0]
            m = np.asarray(mean, dtype=np.float32)[:channels, None, None]
            s = np.asarray(std, dtype=np.float32)[:channels, None, None]
            array = array * s + m  # undo (x - mean) / std
        lo, hi = float(array.min()), float(array.max())
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise GuideError(
                f"images[{k}] has values in [{lo:.2f}, {hi:.2f}], not [0, 1]: pass normalized=True "
                "(and the run's mean/std) for a normalised batch"
            )
        pixels = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    hwc = np.transpose(pixels, (1, 2, 0))
    return hwc[..., 0] if hwc.shape[-1] == 1 else hwc


def _pil_png(image: Image.Image) -> bytes:
    if max(image.size) > MAX_GUIDE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_GUIDE_SIDE, MAX_GUIDE_SIDE))
    return png_encode(np.asarray(image.convert("RGB"), dtype=np.uint8))


def guide_png(
    image: Any, k: int = 0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> bytes:
    """One hard sample as PNG bytes (shrunk to MAX_GUIDE_SIDE); ``mean``/``std``: it is normalised."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)  # already PNG/JPEG: the service checks it (422 naming the item)
    if isinstance(image, Image.Image):
        return _pil_png(image)
    if _is_tensor(image):
        image = image.detach().cpu().numpy()
        return _pil_png(Image.fromarray(_chw_to_uint8(image, k, mean, std)))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
            return _pil_png(
                Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
            )
        return _pil_png(Image.fromarray(_chw_to_uint8(image, k, mean, std)))
    raise GuideError(
        f"images[{k}] is a {type(image).__name__}: give a tensor, a PIL image, a uint8 array or PNG/JPEG bytes"
    )


def guide_pngs(
    images: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> list[bytes]:
    """Every hard sample of ``images`` (a batch or a sequence) as PNG bytes, in order."""
    return [guide_png(image, k, mean, std) for k, image in enumerate(_split_batch(images))]
