"""Which torch device a replica runs on: one rule for the API, the pipeline and the dev tools.

Apart from the pipeline (diffusers), so the API can name the device before the model loads.
"""

from __future__ import annotations

import torch

AUTO = ("", "auto")


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/""/"auto": CUDA when available, else the CPU; anything else as torch reads it."""
    if device is None or device in AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_tag(device: torch.device) -> str:
    """The device as a replica id shows it: ``gpu0``, ``gpu1``, ``cpu``."""
    return f"gpu{device.index or 0}" if device.type == "cuda" else device.type


__all__ = ["resolve_device", "device_tag"]
