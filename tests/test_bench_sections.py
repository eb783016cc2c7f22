"""``make bench``'s section choice and the scaling bench's busy fraction (no time is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from actgen_shared.schemas import JobState, JobStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import noop, run, scaling  # noqa: E402


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


@pytest.mark.slow
def test_the_noop_bench_runs_jobs_through_a_real_replica_and_accounts_for_each(monkeypatch) -> None:
    """A short ``make bench`` noop section: every job comes back, each part of its time is
    measured from its own timestamps, and the load rows count the jobs they ran (no time asserted)."""
    monkeypatch.setattr(noop, "LATENCY_JOBS", 6)
    monkeypatch.setattr(noop, "WARMUP_JOBS", 1)
    monkeypatch.setattr(noop, "CLIENTS", (2,))
    result = noop.run(seconds=0.5)
    latency = result["noop_latency_ms"]
    assert latency["jobs"] == 6
    assert set(latency["split_median_ms"]) == {
        "http_until_queued",
        "queued_until_started",
        "started_until_finished",
        "finished_until_read",
    }
    assert 0 < latency["median"] <= latency["p99"]
    (row,) = result["noop_throughput"]
    assert row["clients"] == 2 and row["jobs_s"] > 0 and row["replica_cpu_ms_per_job"] > 0
    assert "jobs/s" in noop.table(result)
