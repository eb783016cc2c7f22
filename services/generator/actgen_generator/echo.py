"""``serve --sampler echo``: a sampler without a model (guides come back resized, latents are zeros).

For measuring what the service itself adds (REST + Redis + worker) and for API tests that do
not need images to be generated. It honours ``on_step`` like the real sampler and records each
item the way the real sampler does (:func:`~actgen_generator.contract.item_record`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from actgen_generator.contract import (
    Cancelled,
    Classifier,
    SampleItem,
    SampleOutput,
    StepCallback,
    item_draw,
    item_record,
    latent_shape,
)
from actgen_shared.presets import ModelDefaults, resolve_options
from actgen_shared.schemas import GenerationOptions


class EchoSampler:
    """Satisfies :class:`~actgen_generator.contract.Sampler` without a model."""

    def __init__(
        self,
        native_size: int = 64,
        latent_channels: int = 4,
        scale: int = 8,
        step_seconds: float = 0.0,
        inline: bool = False,
    ) -> None:
        self.native_size = native_size
        self.latent_channels = latent_channels
        self.scale = scale
        self.step_seconds = step_seconds  # > 0: every step takes this long (chaos runs, tests)
        # True: small batches run on the worker's event loop (a call takes microseconds; not
        # with step_seconds, and not for a subclass that does more unless it says so)
        self.inline = inline and step_seconds <= 0
        self.model_defaults: ModelDefaults | None = None  # no model, no defaults file: the released preset

    def latent_shape(self, options: GenerationOptions) -> tuple[int, int, int]:
        return latent_shape(options, self.native_size, self.latent_channels, self.scale)

    def __call__(
        self,
        items: list[SampleItem],
        options: GenerationOptions,
        classifier: Classifier | None = None,
        on_step: StepCallback | None = None,
    ) -> list[SampleOutput]:
        total = options.num_inference_steps
        if self.step_seconds > 0:  # a job that takes time, step by step, like the real sampler
            for step in range(1, total + 1):
                time.sleep(self.step_seconds)
                if on_step is not None and not on_step(step, total):
                    raise Cancelled("cancelled")
        elif on_step is not None and not on_step(total, total):
            raise Cancelled("cancelled")
        shape = self.latent_shape(options)
        resolved = resolve_options(options, self.model_defaults)
        outputs = []
        for position, item in enumerate(items):
            record = item_record(
                index=position,
                class_id=item.class_id,
                class_name=item.class_name,
                guide_id=item.guide_id,
                seed=item.seed,
                options=options,
                draw=item_draw(item.seed, item.confidence, options),
                native_size=self.native_size,
                resolved=resolved,
            )
            size = (options.output_size or record.width, options.output_size or record.height)
            image = np.asarray(Image.fromarray(item.guide).resize(size), dtype=np.uint8)
            outputs.append(SampleOutput(image=image, latent=torch.zeros(shape), record=record))
        return outputs


__all__ = ["EchoSampler"]
