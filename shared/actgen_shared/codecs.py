"""Byte formats on the wire and in Redis: PNG images, safetensors latents, base64.

Only safe formats: images go through Pillow, tensors through safetensors (never pickle).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re

import numpy as np
from PIL import Image, UnidentifiedImageError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save


class DecodeError(ValueError):
    """Bytes that are not what they claim to be; the message says what is wrong."""


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict base64 (standard alphabet, padding optional); data-URL prefixes are accepted."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = text.strip()
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"not valid base64: {exc}") from None


# zlib level 1, not Pillow's 6: a 512 px photo encodes in half the time (35 vs 69 ms on a 2-core
# CPU) for a file 6 % larger; the worker encodes every image between two batches.
PNG_COMPRESS_LEVEL = 1


def png_encode(image: np.ndarray) -> bytes:
    """uint8 array HxWx3 (or HxW) -> PNG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"png_encode wants uint8, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def image_decode(data: bytes, max_side: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 RGB array HxWx3, refusing non-images and oversized images.

    The size is checked from the header before the pixels are decoded, so a decompression
    bomb never allocates.
    """
    try:
        img_file = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(
            f"not a decodable image: {len(data)} bytes that are not a PNG, JPEG or WEBP file "
            f"(they start with {data[:8]!r})"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DecodeError(f"not a decodable image: {_pillow_message(exc)}") from None
    try:
        with img_file as img:
            if img.format not in ("PNG", "JPEG", "WEBP"):
                raise DecodeError(f"image format {img.format} not accepted (PNG, JPEG, WEBP)")
            width, height = img.size
            if max_side is not None and max(width, height) > max_side:
                raise DecodeError(f"image is {width}x{height}, larger than {max_side} px on a side")
            if width < 1 or height < 1:
                raise DecodeError("image is empty")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except DecodeError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DecodeError(f"not a decodable image: {_pillow_message(exc)}") from None


def _pillow_message(exc: Exception) -> str:
    """Pillow's message without the repr of our in-memory file ("<_io.BytesIO object at 0x...>")."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)) or type(exc).__name__


def image_from_b64(text: str, max_side: int | None = None) -> np.ndarray:
    return image_decode(b64decode(text), max_side=max_side)


def png_to_b64(image: np.ndarray) -> str:
    return b64encode(png_encode(image))


def tensors_encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Named arrays -> safetensors bytes."""
    return _st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def safetensors_header(data: bytes) -> dict[str, object]:
    """The JSON header of safetensors bytes, checked; DecodeError saying what is wrong.

    The format is an 8-byte little-endian header length N, then N bytes of a JSON object
    (name -> dtype, shape, data_offsets; optional ``__metadata__``), then the tensor data.
    This is how safetensors is recognised: by parsing that header, never by looking at a first
    byte (N's low byte can be anything, 0x80 included, which is also pickle's first byte).
    """
    if len(data) < 8:
        raise DecodeError(f"{len(data)} bytes, too short for the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(SAFETENSORS_MAX_HEADER, len(data) - 8):
        raise DecodeError(f"header length {n} does not fit a file of {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DecodeError("the header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise DecodeError(f"header entry {name!r} lacks dtype, shape or data_offsets")
    return header


def tensors_decode(data: bytes) -> dict[str, np.ndarray]:
    """safetensors bytes -> named arrays; anything else raises DecodeError."""
    try:
        safetensors_header(data)
        return _st_load(data)
    except Exception as exc:
        raise DecodeError(f"not a safetensors file: {exc}") from None


def latent_encode(latent: np.ndarray) -> bytes:
    """One latent (C x H x W) as float16 safetensors bytes: the memory-bank format."""
    return tensors_encode({"latent": latent.astype(np.float16)})


def latent_decode(data: bytes) -> np.ndarray:
    return tensors_decode(data)["latent"]
