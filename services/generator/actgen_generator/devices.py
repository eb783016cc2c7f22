"""Which torch device a replica runs on: one rule for the API, the pipeline and the dev tools.

Apart from the pipeline (diffusers), so the API can name the device before the model loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

AUTO = ("", "auto")
NVIDIA_DEVICE = Path("/dev/nvidia0")  # the first GPU's device node, present once a driver is loaded


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/""/"auto": CUDA when available, else the CPU; anything else as torch reads it.

    A CUDA device always has its index (``cuda`` is the current device, ``cuda:0`` by default),
    so /v1/info and the replica id name the GPU that runs. Without usable CUDA, ``cuda`` stays
    as it is: loading the model onto it then fails with torch's reason.
    """
    if device is None or device in AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def device_tag(device: torch.device) -> str:
    """The device as a replica id shows it: ``gpu0``, ``gpu1``, ``cpu``."""
    return f"gpu{device.index or 0}" if device.type == "cuda" else device.type


def cuda_unusable_reason(nvidia_device: Path | None = None) -> str | None:
    """Why torch cannot use CUDA here, in words; None when it can.

    Tells apart a torch built without CUDA, a GPU whose driver torch cannot use (the device node
    exists, so a driver is loaded: most often one too old for this torch's CUDA), and no GPU.
    """
    if torch.cuda.is_available():
        return None
    nvidia_device = nvidia_device or NVIDIA_DEVICE
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    try:  # torch's own words (the driver version it found, say); is_available() keeps them quiet
        torch.cuda.init()
        detail = ""
    except Exception as exc:  # noqa: BLE001  (any failure of the init is the reason we want)
        detail = f": {exc}"
    if nvidia_device.exists():
        return (
            f"a GPU is present ({nvidia_device}) but torch.cuda.is_available() is False: the NVIDIA "
            f"driver is likely too old for this torch's CUDA {torch.version.cuda}{detail}"
        )
    return f"no NVIDIA GPU or driver found ({nvidia_device} is missing){detail}"


def enable_fast_cuda_math() -> None:
    """TF32 for float32 matmuls and convolutions, and cuDNN autotuning; set once a CUDA pipeline loads.

    The UNet and VAE run in float16 or bfloat16, which TF32 does not touch; float32 work (the
    classifier of eq. 10, the bank distances of eq. 9, a float32 pipeline) gets TF32's 10-bit
    mantissa, which the guidance tolerates. ``cudnn.benchmark`` times the convolution algorithms
    of each new input shape once (the first batch of a new size is slower) and then uses the fastest.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


__all__ = ["cuda_unusable_reason", "device_tag", "enable_fast_cuda_math", "resolve_device"]
