"""Hard samples as guide images: whatever a training loop holds, as the PNG bytes a job carries.

A loop holds its hard samples as torch tensors (CHW, float in [0, 1] or uint8, or normalised with
a mean and std: told, or seen from the batch's values), a batch of them (NCHW), PIL images, uint8 arrays (HxWx3 or HxW) or encoded
PNG/JPEG bytes; :func:`guide_pngs` turns any of these into PNGs, and says which item is wrong
when one cannot be (a shape, NaN or infinite values, a range that is neither [0, 1] nor the
normalised one, with the fix for each case). torch is never imported here: a tensor is recognised by its methods.
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


def _identity(mean: Sequence[float] | None, std: Sequence[float] | None) -> bool:
    """No normalisation to undo: no mean/std, or mean 0 and std 1."""
    return mean is None or std is None or (all(m == 0 for m in mean) and all(v == 1 for v in std))


def _out_of_range(lo: float, hi: float) -> bool:
    return lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK


def _range_hint(k: int, lo: float, hi: float, undone: bool) -> str:
    """What values outside [0, 1] most likely mean, and the fix for that case."""
    where = f"images[{k}] has values in [{lo:.2f}, {hi:.2f}]"
    if undone:
        return (
            f"{where} after undoing the normalisation, not [0, 1]: are mean= and std= the ones the "
            "images were normalised with?"
        )
    if lo >= -RANGE_SLACK and hi <= 255 + RANGE_SLACK:
        return f"{where}: pixel values 0..255 in a float tensor? divide by 255 (or pass uint8)"
    return (
        f"{where}, not [0, 1]: a normalised image? give the run the mean= and std= it was "
        "normalised with (and normalized=True)"
    )


def _float_chw(image: Any, k: int) -> np.ndarray | None:
    """A float C x H x W item as float32 (its finiteness checked); None for anything else."""
    array = image.detach().cpu().numpy() if _is_tensor(image) else image
    if not isinstance(array, np.ndarray) or array.dtype == np.uint8 or array.dtype.kind not in "fiu":
        return None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise GuideError(
            f"images[{k}] has {bad} values that are NaN or infinite: a guide needs finite pixels"
        )
    return array.astype(np.float32)


def looks_normalised(
    images: Sequence[Any], mean: Sequence[float] | None, std: Sequence[float] | None
) -> bool:
    """Whether a batch of float CHW items is normalised (some value outside [0, 1]) and
    ``mean``/``std`` can undo it; decided for the whole batch, so one bright item is not taken
    for a [0, 1] one."""
    if _identity(mean, std):
        return False
    for k, image in enumerate(images):
        array = _float_chw(image, k)
        if array is not None and array.size and _out_of_range(float(array.min()), float(array.max())):
            return True
    return False


def _chw_to_uint8(
    array: np.ndarray, k: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """CxHxW (float in [0, 1], normalised float, or uint8) -> HxWx3 (or HxW) uint8."""
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise GuideError(f"images[{k}] must be C x H x W with 1 or 3 channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        pixels = array
    else:
        checked = _float_chw(array, k)
        if checked is None:
            raise GuideError(f"images[{k}] has dtype {array.dtype}: give float in [0, 1] or uint8")
        array = checked
        undone = not _identity(mean, std)
        if undone:
            assert mean is not None and std is not None
            channels = array.shape[0]
            m = np.asarray(mean, dtype=np.float32)[:channels, None, None]
            s = np.asarray(std, dtype=np.float32)[:channels, None, None]
            array = array * s + m  # undo (x - mean) / std
        lo, hi = float(array.min()), float(array.max())
        if _out_of_range(lo, hi):
            raise GuideError(_range_hint(k, lo, hi, undone))
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
    images: Any,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalized: bool | None = None,
) -> list[bytes]:
    """Every hard sample of ``images`` (a batch or a sequence) as PNG bytes, in order.

    ``normalized``: True, float images are normalised with ``mean``/``std`` (undone here);
    False, they are in [0, 1]; None (the default), the batch says which: normalised when some
    value lies outside [0, 1] and ``mean``/``std`` are given (:func:`looks_normalised`).
    """
    items = _split_batch(images)
    if normalized is None:
        normalized = looks_normalised(items, mean, std)
    if not normalized:
        mean = std = None
    return [guide_png(image, k, mean, std) for k, image in enumerate(items)]
