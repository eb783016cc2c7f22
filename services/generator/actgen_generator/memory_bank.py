"""Memory banks (docs/architecture.md section 4) as the sampler wants them: one (N, C, h, w) tensor per class.

The bank itself lives in Redis (``bank:{key}:{class_id}``, float16 safetensors latents, capped
per class) and is shared by every replica; the queue pushes a finished item's latent into it.
The worker samples up to ``options.bank_sample`` latents per class when each batch starts, so
the contrastive loss (eq. 9) pushes away from everything the run made until a moment ago: the
run's earlier jobs and this job's earlier batches (its items in the same batch are added by the
sampler itself).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from actgen_shared import codecs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from actgen_shared.queue import JobQueue


def stack_latents(blobs: Iterable[bytes], shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """Bank entries -> float32 tensor (N, C, h, w); entries of another shape are left out.

    A bank key shared by jobs of different sizes holds latents of several shapes; only those
    of this job's latent shape can be compared with its predicted latent.
    """
    import torch

    arrays = []
    for blob in blobs:
        try:
            latent = codecs.latent_decode(blob)
        except (codecs.DecodeError, KeyError):
            continue  # a damaged entry must not fail the job
        if shape is not None and tuple(latent.shape) != tuple(shape):
            continue
        arrays.append(latent.astype(np.float32))
    if not arrays:
        return None
    if shape is None:  # keep the most common shape
        first = max({a.shape for a in arrays}, key=lambda s: sum(a.shape == s for a in arrays))
        arrays = [a for a in arrays if a.shape == first]
    return torch.from_numpy(np.stack(arrays))


async def sample_banks(
    queue: JobQueue,
    bank_key: str,
    class_ids: Iterable[int],
    n: int,
    seed: int,
    shape: tuple[int, ...] | None = None,
    tenant: str = "default",
) -> dict[int, torch.Tensor]:
    """Up to ``n`` latents per class from the bank (of ``tenant``), drawn reproducibly from ``seed``."""
    banks: dict[int, torch.Tensor] = {}
    if n <= 0:
        return banks
    rng = random.Random(seed)
    for class_id in sorted(set(class_ids)):
        blobs = await queue.bank_sample(bank_key, class_id, n, rng, tenant=tenant)
        if not blobs:
            continue
        tensor = await asyncio.to_thread(stack_latents, blobs, shape)
        if tensor is not None:
            banks[class_id] = tensor
    return banks
