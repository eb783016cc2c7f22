"""What the worker and a sampler agree on: the items in, the outputs out, and each item's record.

A sampler (:class:`~actgen_generator.sampler.GuidedSampler`, or
:class:`~actgen_generator.echo.EchoSampler` without a model) takes a batch of
:class:`SampleItem` and returns one :class:`SampleOutput` each. An item's random decisions (plain
SD draw, adversarial draw) come from a stream seeded by its seed alone, so :func:`item_draw`
tells what they were without sampling, and :func:`item_record` writes the provenance of an item
the same way wherever it is written: by the sampler, or by a worker completing a job whose item
an earlier delivery stored.

Importing this module does not import torch (an API-only replica never loads it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from actgen_shared.presets import ModelDefaults
from actgen_shared.schemas import GenerationOptions, GradStepRecord, ItemResult, Mode, ResolvedOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Decisions (plain draw, adversarial draw, bank order) use a second stream derived from the
# seed, so the noise of a seed is the same in every mode and with or without a memory bank.
DECISION_SEED_OFFSET = 0x9E3779B97F4A7C15

StepCallback = Callable[[int, int], bool]  # (step, total) -> False to stop the batch
SAMPLERS = ("guided", "echo")  # what `serve --sampler` can run: the model, or guides echoed back


@dataclass
class SampleItem:
    """One hard sample to imitate."""

    guide: np.ndarray  # uint8 HxWx3 guide image (any size; resized to generation size)
    class_id: int
    class_name: str
    seed: int  # per-item seed: fixes all of this item's noise
    guide_id: str | None = None
    confidence: float | None = None
    bank: torch.Tensor | None = None  # (N, C, h, w) latents of this class in this item's job's memory bank
    bank_group: str | None = None  # same group and class in one batch: each counts in the other's bank


@dataclass
class Classifier:
    """The trainer's current classifier, for the adversarial loss (eq. 10)."""

    module: torch.nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ref: str | None = None


@dataclass
class SampleOutput:
    image: np.ndarray  # uint8 HxWx3 at options.output_size if set, else generation size
    latent: torch.Tensor  # final latent (C, h, w), float32, cpu
    record: ItemResult  # provenance, with grad_records per gradient step


class Cancelled(Exception):
    """``on_step`` asked to stop between two denoising steps."""


class Sampler(Protocol):
    """What the worker needs of a sampler: ``GuidedSampler`` or ``EchoSampler``."""

    @property
    def native_size(self) -> int:
        """Generation size (px) when the options name none."""
        ...

    @property
    def model_defaults(self) -> ModelDefaults | None:
        """The loaded model's own defaults file (actgen_shared.presets), None for none."""
        ...

    @property
    def inline(self) -> bool:
        """True for a sampler without a model whose call takes microseconds: the worker runs a
        batch of a few small images on its event loop rather than hopping to a thread."""
        ...

    def latent_shape(self, options: GenerationOptions) -> tuple[int, int, int]:
        """(C, h, w) of the latents a job with these options makes."""
        ...

    def __call__(
        self,
        items: list[SampleItem],
        options: GenerationOptions,
        classifier: Classifier | None = None,
        on_step: StepCallback | None = None,
    ) -> list[SampleOutput]: ...


def generation_size(options: GenerationOptions, native_size: int) -> tuple[int, int]:
    """(width, height) in px that the sampler generates at (before any ``output_size`` resize)."""
    return options.width or native_size, options.height or native_size


def latent_shape(
    options: GenerationOptions, native_size: int, channels: int, scale: int
) -> tuple[int, int, int]:
    """(C, h, w) of the latents of a job: the generation size over the VAE's scale factor."""
    width, height = generation_size(options, native_size)
    return channels, height // scale, width // scale


@dataclass(frozen=True)
class ItemDraw:
    """An item's random decisions, fixed by its seed (and its confidence, for few-shot strength)."""

    plain: bool  # a plain SD draw: no guidance at all (options.plain_prob)
    adversarial: bool  # uses L_adv (options.adv_prob; actgen mode with gradient steps only)
    strength: float  # i of gamma_t: options.image_guidance_strength, or few-shot from the confidence,
    # scaled to the steps (guidance.gamma_midpoint)


def decision_stream(seed: int) -> torch.Generator:
    """The item's decision generator: draw_decisions reads it first, the bank draws after."""
    import torch  # here, not at the top: the API imports this module without torch

    return torch.Generator().manual_seed((seed + DECISION_SEED_OFFSET) % 2**64)


def draw_decisions(
    decisions: torch.Generator, confidence: float | None, options: GenerationOptions
) -> ItemDraw:
    """Read an item's decisions from its stream (always two draws, in every mode)."""
    import torch

    from actgen_generator.guidance import fewshot_strength, gamma_midpoint  # imports torch too

    plain = bool(torch.rand((), generator=decisions) < options.plain_prob)
    adversarial = bool(torch.rand((), generator=decisions) < options.adv_prob)
    adversarial = adversarial and options.mode is Mode.actgen and not plain and options.grad_steps > 0
    strength = options.image_guidance_strength
    if options.fewshot_u is not None:
        if confidence is None:
            raise ValueError("options.fewshot_u needs a confidence on every item")
        strength = fewshot_strength(confidence, options.fewshot_u)
    # eta_f is stated for A.3's 40 steps as i is for 5.1's: both scale the same way
    strength = gamma_midpoint(strength, options.num_inference_steps, options.image_guidance_reference_steps)
    return ItemDraw(plain=plain, adversarial=adversarial, strength=strength)


def item_draw(seed: int, confidence: float | None, options: GenerationOptions) -> ItemDraw:
    """The decisions the sampler makes for an item of this seed, without sampling it."""
    return draw_decisions(decision_stream(seed), confidence, options)


def item_record(
    *,
    index: int,
    class_id: int,
    class_name: str,
    guide_id: str | None,
    seed: int,
    options: GenerationOptions,
    draw: ItemDraw,
    native_size: int,
    resolved: ResolvedOptions,
    grad_records: Sequence[GradStepRecord] = (),
    zero_grad_steps: int = 0,
    nonfinite_grad_steps: int = 0,
) -> ItemResult:
    """An item's provenance: what made it. ``width``/``height`` are the generation size
    (docs/architecture.md 3: options.width/height); ``output_size`` is in the job's options; a plain draw
    is recorded as mode ``random``; ``resolved`` is what the options left to the preset or the model."""
    width, height = generation_size(options, native_size)
    return ItemResult(
        index=index,
        class_id=class_id,
        class_name=class_name,
        guide_id=guide_id,
        seed=seed,
        mode=Mode.random if draw.plain else options.mode,
        adversarial=draw.adversarial,
        image_guidance_strength=draw.strength,
        grad_records=list(grad_records),
        zero_grad_steps=zero_grad_steps,
        nonfinite_grad_steps=nonfinite_grad_steps,
        width=width,
        height=height,
        resolved=resolved,
    )


__all__ = [
    "Cancelled",
    "SAMPLERS",
    "Classifier",
    "ItemDraw",
    "SampleItem",
    "SampleOutput",
    "Sampler",
    "StepCallback",
    "decision_stream",
    "draw_decisions",
    "generation_size",
    "item_draw",
    "item_record",
    "latent_shape",
]
