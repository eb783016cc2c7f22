"""``make bench``'s section choice and the scaling bench's busy fraction (no time is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from actgen_shared.schemas import JobState, JobStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run, scaling  # noqa: E402


def test_only_picks_sections_in_the_bench_order_and_skips_what_cannot_run() -> None:
    assert run._sections("scaling,tiny", set()) == ["tiny", "scaling"]
    assert run._sections(None, {"sd21gpu"}) == [s for s in run.SECTIONS if s != "sd21gpu"]
    assert run._sections("sd21gpu,stall", {"sd21gpu"}) == ["stall"]


def test_an_unknown_section_is_an_error_naming_it() -> None:
    with pytest.raises(SystemExit, match="nope"):
        run._sections("tiny,nope", set())


def _state(replica: str, start: float, end: float) -> JobState:
    return JobState(
        job_id=f"{replica}-{start}",
        run_id="r",
        status=JobStatus.done,
        started_at=start,
        finished_at=end,
        replica=replica,
    )


def test_busy_fraction_counts_each_replicas_batches_over_the_whole_run() -> None:
    b = scaling.BATCH_S
    states = [_state("a", 0.0, b), _state("a", b, 2 * b), _state("b", 0.0, b)]
    busy = scaling._busy(states, 0.0, 2 * b)
    assert busy == pytest.approx({"a": 1.0, "b": 0.5})
