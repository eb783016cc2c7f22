"""One record of an item, wherever it is written: by the sampler, the echo sampler, or a worker
completing a job whose item an earlier delivery stored (docs/architecture.md 3: width/height are the
generation size; a plain SD draw is mode ``random``; few-shot strength comes from the confidence)."""

from __future__ import annotations

import numpy as np
import pytest

from actgen_generator.contract import SampleItem, item_draw, item_record
from actgen_generator.echo import EchoSampler
from actgen_shared.presets import resolve_options
from actgen_shared.schemas import GenerationOptions, ItemResult, Mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS = 8


def _items(confidence: bool) -> list[SampleItem]:
    rng = np.random.default_rng(0)
    return [
        SampleItem(
            guide=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            class_id=k % 3,
            class_name=f"digit {k}",
            seed=1000 + k,
            guide_id=f"g{k}",
            confidence=(k + 1) / (N_ITEMS + 1) if confidence else None,
        )
        for k in range(N_ITEMS)
    ]


def _fallback(
    item: SampleItem, index: int, options: GenerationOptions, native_size: int, model_defaults=None
) -> ItemResult:
    """What the worker writes for an item stored by an earlier delivery (it has no sampler output)."""
    return item_record(
        index=index,
        class_id=item.class_id,
        class_name=item.class_name,
        guide_id=item.guide_id,
        seed=item.seed,
        options=options,
        draw=item_draw(item.seed, item.confidence, options),
        native_size=native_size,
        resolved=resolve_options(options, model_defaults),
    )


FEWSHOT = GenerationOptions(
    mode=Mode.ig, num_inference_steps=2, plain_prob=0.5, fewshot_u=0.5, width=96, height=64, output_size=16
)
ADVERSARIAL = GenerationOptions(
    mode=Mode.actgen, num_inference_steps=2, grad_steps=1, adv_prob=0.5, plain_prob=0.3, bank_sample=0
)


@pytest.mark.parametrize("options", [FEWSHOT], ids=["fewshot-plain-resized"])
def test_sampler_and_fallback_write_the_same_record(sampler, options: GenerationOptions) -> None:
    items = _items(confidence=True)
    outputs = sampler(items, options)
    records = [o.record for o in outputs]
    assert records == [_fallback(item, k, options, sampler.native_size) for k, item in enumerate(items)]
    assert {r.mode for r in records} == {Mode.random, Mode.ig}  # plain draws are recorded as such
    assert len({r.image_guidance_strength for r in records}) == N_ITEMS  # few-shot: one per confidence
    assert {(r.width, r.height) for r in records} == {(96, 64)}  # generation size, not output_size
    assert {o.image.shape for o in outputs} == {(16, 16, 3)}


def test_adversarial_draws_match_without_the_losses(sampler) -> None:
    from actgen_generator.sampler import Classifier
    from actgen_shared.architectures import build_classifier

    classifier = Classifier(build_classifier("simple_cnn", 3).eval(), 32, (0.5,) * 3, (0.5,) * 3)
    items = _items(confidence=False)
    records = [o.record for o in sampler(items, ADVERSARIAL, classifier=classifier)]
    fallback = [_fallback(item, k, ADVERSARIAL, sampler.native_size) for k, item in enumerate(items)]
    assert {r.adversarial for r in records} == {True, False}
    for made, redrawn in zip(records, fallback, strict=True):
        assert made.model_copy(update={"grad_records": []}) == redrawn  # the losses are only the sampler's


def test_the_echo_sampler_records_what_the_real_one_would() -> None:
    echo = EchoSampler(native_size=32)
    items = _items(confidence=True)
    outputs = echo(items, FEWSHOT)
    assert [o.record for o in outputs] == [_fallback(item, k, FEWSHOT, 32) for k, item in enumerate(items)]
    assert {o.image.shape for o in outputs} == {(16, 16, 3)}
    assert {tuple(o.latent.shape) for o in outputs} == {echo.latent_shape(FEWSHOT)} == {(4, 8, 12)}


def test_the_workers_two_record_sites_agree() -> None:
    """A worker writes an item's record from the sampler's output, or (when an earlier delivery
    stored the item) redraws it: both must say the same, plain draws and few-shot strength included."""
    from service_helpers import job_body, new_run_id

    from actgen_generator.batch import ActiveJob, compute_batch
    from actgen_shared.consumer import Delivery
    from actgen_shared.schemas import JobRequest

    body = job_body(
        new_run_id(),
        n_items=N_ITEMS,
        mode="ig",
        options={"plain_prob": 0.5, "fewshot_u": 0.5, "width": 96, "output_size": 16},
    )
    for k, item in enumerate(body["items"]):
        item["confidence"] = (k + 1) / (N_ITEMS + 1)
    request = JobRequest.model_validate(body)
    job = ActiveJob(
        Delivery("0-1", "job-records", 1, request), request.resolved_class_names(), list(range(N_ITEMS))
    )
    echo = EchoSampler(native_size=32)
    done = compute_batch(echo, [(job, k) for k in range(N_ITEMS)], {}, lambda step, total: True, 1024)
    made = [record for record, _ in done]
    assert made == [job.record_of(k, echo.native_size, echo.model_defaults) for k in range(N_ITEMS)]
    assert {r.mode for r in made} == {Mode.random, Mode.ig}
    assert {(r.width, r.height) for r in made} == {(96, request.options.height)}
