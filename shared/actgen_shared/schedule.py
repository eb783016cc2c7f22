"""The run's schedule (docs/architecture.md 6): which epochs post hard samples, when the final wait
comes, how the chance of adversarial guidance grows, and how a budget is spread over the epochs.

One copy for every loop: the trainer (``actgen_trainer.link``), the client API (``ActGenRun`` given
``epochs=``) and the Lightning callback compute these here, so they ramp alike.
"""

from __future__ import annotations

from typing import Any, Literal

from actgen_shared.ranks import share

ScheduleName = Literal["paper", "authors", "constant"]
END_ADV_PROB = 0.5  # where every schedule ends (paper section 4.3)


def schedule_for(preset: str | None) -> ScheduleName:
    """The preset's schedule: the released code's (``authors``) with ``released``, the text's
    (``paper``) otherwise (``paper``, and no preset: a model's own defaults)."""
    return "authors" if preset == "released" else "paper"


def adversarial_options(schedule: str, epoch: int, epochs: int) -> dict[str, Any]:
    """The job options of ``epoch`` of ``epochs`` that the schedule sets.

    ``paper``: adv_prob = 0.5 e / E (appendix A.4). ``authors``: a share r = max(1 - e / (0.5 E - 1),
    0) / 2 of the items is drawn as plain SD and adv_prob = 0.5 - r (hunto/ActGen's train.py).
    ``constant``: adv_prob = 0.5 from the first job.
    """
    if schedule == "authors":
        ramp = 0.5 * epochs - 1
        plain = max(1.0 - epoch / ramp, 0.0) * END_ADV_PROB if ramp > 0 else 0.0
        return {"plain_prob": plain, "adv_prob": END_ADV_PROB - plain}
    if schedule == "constant":
        return {"adv_prob": END_ADV_PROB}
    if schedule != "paper":
        raise ValueError(f"unknown adversarial schedule {schedule!r}: paper, authors or constant")
    return {"adv_prob": END_ADV_PROB * epoch / epochs}


def generation_epochs(epochs: int, fraction: float) -> int:
    """Hard samples are posted after epochs 0 .. this - 1 (the first ``fraction`` of training)."""
    return max(1, int(epochs * fraction))


def final_wait_epoch(epochs: int, generation: int) -> int | None:
    """The epoch that starts with the bounded wait for the jobs still out: the one after the
    last post's (so its images are still on time), the last epoch when that comes sooner, None
    when no epoch follows the last post."""
    last = epochs - 1
    return min(generation + 1, last) if last >= generation else None


def images_for_epoch(total: int, generation: int, epoch: int) -> int:
    """A run's ``total`` images spread over its ``generation`` epochs, the remainder to the early ones."""
    return share(total, generation, epoch) if epoch < generation else 0


__all__ = [
    "END_ADV_PROB",
    "ScheduleName",
    "adversarial_options",
    "final_wait_epoch",
    "generation_epochs",
    "images_for_epoch",
    "schedule_for",
]
