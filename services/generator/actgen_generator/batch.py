"""One sampler batch: the jobs a replica runs, which of their items share a batch, and the work
done off the event loop: in the sampler's thread (decode the guides, sample: :func:`sample_batch`),
then encoding the PNGs and latents (:func:`encode_batch`), which the worker runs while the next
batch samples (``ACTGEN_OVERLAP_ENCODE``, docs/architecture.md 4.5).

No Redis here: the worker (worker.py) fetches, stores and finishes; this module only decides
and computes. Compatible jobs share a batch: the same options apart from the seed (so also the
same mode, steps and size), the same classifier and the same bank. Item ``k`` of a job always
uses seed ``item_seed(options.seed, k)``, whichever batch it runs in, and contrasts with its own
job's memory bank, never with another job's.
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from actgen_generator.contract import (
    Classifier,
    SampleItem,
    SampleOutput,
    Sampler,
    StepCallback,
    generation_size,
    item_draw,
    item_record,
)
from actgen_shared import codecs
from actgen_shared.consumer import Delivery, StoredItem
from actgen_shared.presets import ModelDefaults, resolve_options
from actgen_shared.schemas import ItemResult, JobRequest
from actgen_shared.seeds import item_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

Bank = Mapping[int, "torch.Tensor"]  # class id -> (N, C, h, w) latents of one job's memory bank
BatchKey = tuple[tuple[object, ...], str, str | None, str | None]
# Guide (base64) and output (RGB) bytes up to which an inline sampler's batch runs on the event
# loop: about 0.5 ms of decoding and PNG encoding on one CPU core, a few times the hop to a thread.
INLINE_BATCH_BYTES = 32 * 1024


@dataclass
class ActiveJob:
    """A started job on this replica and what is left of it."""

    delivery: Delivery
    class_names: list[str]
    pending: list[int]
    classifier: Classifier | None = None
    records: dict[int, ItemResult] = field(default_factory=dict)
    # sampled items whose PNGs and latents are being encoded and stored: pending still, never resampled
    encoding: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    @property
    def job_id(self) -> str:
        return self.delivery.job_id

    @property
    def to_sample(self) -> list[int]:
        """Pending items that no batch has sampled yet (or whose store failed: they run again)."""
        return [k for k in self.pending if k not in self.encoding]

    @property
    def request(self) -> JobRequest:
        return self.delivery.request

    @property
    def batch_key(self) -> BatchKey:
        req = self.request
        return (
            req.options.batch_signature(),
            req.options.model_dump_json(exclude={"seed"}),
            req.classifier_ref if req.needs_classifier else None,
            req.memory_bank_key,
        )

    def record_of(self, index: int, native_size: int, model_defaults: ModelDefaults | None) -> ItemResult:
        """Item ``index``'s record as the sampler wrote it, for an item an earlier delivery of the
        job stored (maybe on another replica): its decisions redrawn from its seed, its options
        resolved for this replica's model; its gradient-step losses are known only to the sampler
        that ran it."""
        options, item = self.request.options, self.request.items[index]
        seed = item_seed(options.seed or 0, index)
        return item_record(
            index=index,
            class_id=item.class_id,
            class_name=self.class_names[item.class_id],
            guide_id=item.guide_id,
            seed=seed,
            options=options,
            draw=item_draw(seed, item.confidence, options),
            native_size=native_size,
            resolved=resolve_options(options, model_defaults),
        )


def next_batch(active: Iterable[ActiveJob], solo: Collection[str], limit: int) -> list[tuple[ActiveJob, int]]:
    """Up to ``limit`` items still to sample of the oldest job that has any and of jobs compatible
    with it (a job in ``solo``, whose shared batch failed, takes no company); empty when every
    pending item is being encoded and stored."""
    jobs = [job for job in active if job.to_sample]
    if not jobs:
        return []
    first = jobs[0]
    key = first.batch_key
    batch: list[tuple[ActiveJob, int]] = []
    for job in jobs:
        if job.batch_key != key or (job is not first and (first.job_id in solo or job.job_id in solo)):
            continue
        for index in job.to_sample:
            if len(batch) >= limit:
                return batch
            batch.append((job, index))
    return batch


def runs_inline(sampler: Sampler, batch: list[tuple[ActiveJob, int]]) -> bool:
    """Whether to compute the batch on the event loop instead of a thread: the sampler says it
    does no real work (``Sampler.inline``) and the batch's images are few and small."""
    if not sampler.inline:
        return False
    size = 0
    for job, index in batch:
        options = job.request.options
        width, height = generation_size(options, sampler.native_size)
        side = options.output_size
        size += len(job.request.items[index].image) + 3 * (side * side if side else width * height)
    return size <= INLINE_BATCH_BYTES


def sample_batch(
    sampler: Sampler,
    batch: list[tuple[ActiveJob, int]],
    banks: Mapping[str, Bank],
    on_step: StepCallback,
    max_image_side: int,
) -> list[SampleOutput]:
    """The batch's sampler work: decode the guides, sample; the outputs' latents are moved to the
    host here, so what follows (:func:`encode_batch`) never touches the device.

    The jobs of a batch share their options (but the seed) and classifier: the first job's are used.
    """
    first = batch[0][0]
    items = []
    for job, index in batch:
        item = job.request.items[index]
        items.append(
            SampleItem(
                guide=codecs.image_from_b64(item.image, max_side=max_image_side),
                class_id=item.class_id,
                class_name=job.class_names[item.class_id],
                seed=item_seed(job.request.options.seed or 0, index),
                guide_id=item.guide_id,
                confidence=item.confidence,
                bank=banks.get(job.job_id, {}).get(item.class_id),  # this job's bank only
                bank_group=job.job_id,
            )
        )
    outputs = sampler(items, first.request.options, classifier=first.classifier, on_step=on_step)
    if len(outputs) != len(batch):
        raise RuntimeError(f"sampler returned {len(outputs)} outputs for {len(batch)} items")
    for output in outputs:
        if output.latent is not None:
            output.latent = output.latent.detach().float().cpu()
    return outputs


def encode_batch(
    batch: list[tuple[ActiveJob, int]], outputs: list[SampleOutput]
) -> list[tuple[ItemResult, StoredItem]]:
    """Each item's PNG and (when kept) latent bytes, with its record: host work only."""
    done = []
    for (job, index), output in zip(batch, outputs, strict=True):
        request, item = job.request, job.request.items[index]
        latent = None
        if (request.options.return_latents or request.memory_bank_key) and output.latent is not None:
            latent = codecs.latent_encode(output.latent.numpy())
        stored = StoredItem(
            index=index,
            class_id=item.class_id,
            guide_id=item.guide_id,
            png=codecs.png_encode(np.ascontiguousarray(output.image)),
            latent=latent,
        )
        done.append((output.record.model_copy(update={"index": index}), stored))
    return done


def compute_batch(
    sampler: Sampler,
    batch: list[tuple[ActiveJob, int]],
    banks: Mapping[str, Bank],
    on_step: StepCallback,
    max_image_side: int,
) -> list[tuple[ItemResult, StoredItem]]:
    """:func:`sample_batch` then :func:`encode_batch` in one hop (the worker without overlap)."""
    return encode_batch(batch, sample_batch(sampler, batch, banks, on_step, max_image_side))


# Allocation failures, as torch and the CUDA libraries word them: "CUDA out of memory",
# "CUDA error: out of memory", cuBLAS and cuDNN failing to get their workspace.
OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
)
# Errors after which the CUDA context is unusable: only a new process can use the GPU again.
DEVICE_LOST_MARKERS = ("CUDA error", "illegal memory access", "device-side assert")


def out_of_memory(exc: BaseException) -> bool:
    """A (CUDA or CPU) allocation failure: worth retrying with fewer items."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


def device_lost(exc: BaseException) -> bool:
    """An unrecoverable accelerator error (illegal memory access, device-side assert, any CUDA
    error that is not an allocation failure, ``torch.AcceleratorError``): no batch can run here again."""
    if out_of_memory(exc):
        return False
    return type(exc).__name__ == "AcceleratorError" or any(m in str(exc) for m in DEVICE_LOST_MARKERS)


def free_memory(exc: BaseException) -> None:
    """Let go of what a failed batch still holds before a smaller one runs: the finished frames of
    its traceback (they keep its tensors alive), then the garbage, then torch's CUDA cache."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:  # its causes hold frames too
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    torch = sys.modules.get("torch")  # an API-only replica never imports it
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


__all__ = [
    "INLINE_BATCH_BYTES",
    "ActiveJob",
    "Bank",
    "compute_batch",
    "device_lost",
    "encode_batch",
    "free_memory",
    "next_batch",
    "out_of_memory",
    "runs_inline",
    "sample_batch",
]
