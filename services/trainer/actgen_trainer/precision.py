"""How the trainer's network computes on its device: mixed precision and memory format.

* ``train.amp``: ``auto`` is bfloat16 on a CUDA GPU with native bfloat16 (compute capability 8.0
  and up), float16 on an older one, and float32 on the CPU (CPU autocast rarely pays there);
  ``bf16`` and ``fp16`` ask for that dtype on any device (torch autocasts on the CPU too), ``off``
  for float32. float16 trains with a GradScaler: its small gradients underflow without loss
  scaling; bfloat16 has float32's range and needs none.
* channels_last on CUDA for a convolutional network (one whose Conv2d weights hold most of its
  parameters; a ViT's single patch-embedding convolution does not count): cuDNN's NHWC kernels,
  the layout tensor cores work in. The inputs are converted with the host-to-device copy.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` means on ``device``; None: float32."""
    if amp != "auto":
        return AMP_DTYPES[amp]
    if device.type != "cuda":
        return None
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.bfloat16 if native_bf16 else torch.float16


def is_conv_net(model: nn.Module) -> bool:
    """Whether most of ``model``'s parameters are Conv2d weights (ResNet, VGG, the simple CNN)."""
    total = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    return total > 0 and 2 * conv > total


@dataclass(frozen=True)
class Compute:
    """The device, the autocast dtype (None: float32) and the memory format of the network's inputs."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device, amp: str) -> Compute:
        """``train.amp`` resolved for ``device``; channels_last for a conv net on CUDA."""
        channels_last = device.type == "cuda" and is_conv_net(model)
        return cls(
            device=device,
            amp_dtype=amp_dtype(amp, device),
            memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        )

    @property
    def scaled(self) -> bool:
        """float16 autocast: the loss is scaled (GradScaler) so its gradients do not underflow."""
        return self.amp_dtype == torch.float16

    @property
    def amp_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp_dtype]

    def autocast(self) -> AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled for float16 only (a disabled scaler's scale/step/update pass straight through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.scaled)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model in this memory format (before DDP wraps it and the optimizer takes its parameters)."""
        return model.to(memory_format=self.memory_format)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on the device in the model's memory format (asynchronous from pinned memory)."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)


__all__ = ["AMP_DTYPES", "Compute", "amp_dtype", "is_conv_net"]
