"""The eq. 11 gradient through a float16 UNet: loss scaling, and which items' gradients are usable.

In float16 a small gradient underflows to zero inside the backward (the UNet's and the VAE's
activations hold float16 gradients), and a large one overflows to inf. Eq. 11 normalises each
item's gradient, so the loss can be multiplied by any constant before the backward and the
gradient divided by it after at no cost: a power of two that lifts the gradients out of the
subnormal range. :class:`LossScale` adjusts it as ``torch.amp.GradScaler`` does (halved at a
non-finite gradient, doubled after a run of finite ones), on the device, so no step waits for
the host; it halves at most once a batch, so one batch whose gradient is NaN whatever the scale
(a broken classifier, say) cannot push it down into underflow for the batches after. float32 and
bfloat16 (float32's exponent range) need no scale: it stays 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INIT_SCALE = 2.0**12  # float16: lifts gradients down to ~1e-11 above the subnormal range
MIN_SCALE = 2.0**-8
MAX_SCALE = 2.0**16
GROWTH_INTERVAL = 200  # guided steps in a row with finite gradients before the scale doubles


def scaled_gradients(
    loss: torch.Tensor, leaves: Sequence[torch.Tensor], scale: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, ...]:
    """d loss / d leaves in float32, backpropagated as ``loss * scale`` and divided by ``scale``.

    A leaf the loss does not reach gets a zero gradient.
    """
    grads = torch.autograd.grad(loss * scale, tuple(leaves), allow_unused=True)
    return tuple(
        torch.zeros_like(leaf, dtype=torch.float32) if g is None else g.float() / scale
        for leaf, g in zip(leaves, grads, strict=True)
    )


def gradient_health(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item (row), over all its gradients: (finite, zero), both (G,) bool.

    ``finite``: no inf or NaN in any of them; ``zero``: finite and all zero (eq. 11 does not move it).
    """
    finite = torch.stack([g.flatten(1).isfinite().all(1) for g in grads]).all(0)
    zero = torch.stack([(g.flatten(1) == 0).all(1) for g in grads]).all(0) & finite
    return finite, zero


class LossScale:
    """A dynamic loss scale kept on the device; 1 (and never changed) unless ``dtype`` is float16."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.enabled = dtype == torch.float16
        self.value = torch.tensor(INIT_SCALE if self.enabled else 1.0, device=device)
        self._finite_run = torch.zeros((), dtype=torch.int64, device=device)
        self._floor = self.value / 2  # the lowest this batch may take it to

    def begin_batch(self) -> None:
        """A new batch may halve the scale once more."""
        if self.enabled:
            self._floor = (self.value / 2).clamp(min=MIN_SCALE)

    def update(self, finite: torch.Tensor) -> None:
        """After a guided step: halve at any non-finite item gradient, double after a finite run."""
        if not self.enabled:
            return
        ok = finite.all()
        run = torch.where(ok, self._finite_run + 1, torch.zeros_like(self._finite_run))
        grow = run >= GROWTH_INTERVAL
        grown = torch.where(grow, (self.value * 2).clamp(max=MAX_SCALE), self.value)
        self.value = torch.where(ok, grown, torch.maximum(self.value / 2, self._floor))
        self._finite_run = torch.where(grow, torch.zeros_like(run), run)


__all__ = ["INIT_SCALE", "LossScale", "gradient_health", "scaled_gradients"]
