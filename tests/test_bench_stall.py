"""``actgen_trainer.bench`` (the ``stall`` section): where its processes run, and its figures.

No time is asserted: the figures are checked on made-up runs, and one short real bench run
checks that every arm ran and reported what it should.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.schemas import JobState, JobStatus
from actgen_trainer import bench

CORES = sorted(os.sched_getaffinity(0))
two_cores = pytest.mark.skipif(len(CORES) < 2, reason="needs two CPU cores")


@two_cores
def test_a_replica_started_on_the_generator_cores_keeps_every_thread_there() -> None:
    """Pinning a running replica by pid moves its main thread only; starting it there moves all."""
    mine = os.sched_getaffinity(0)
    with bench.spawning_on({CORES[-1]}):
        redis_server = EmbeddedRedis().start()
        replica = GeneratorProcess(redis_url=redis_server.url, extra_args=["--sampler", "echo"])
        replica.start()
    try:
        assert os.sched_getaffinity(0) == mine  # this process is back where it was
        assert replica.pid is not None and len(os.listdir(f"/proc/{replica.pid}/task")) > 1
        assert bench.process_cores(replica.pid) == {CORES[-1]}
        assert redis_server.process is not None
        assert bench.process_cores(redis_server.process.pid) == {CORES[-1]}
    finally:
        replica.stop()
        redis_server.stop()


def _job(start: float | None, end: float | None) -> JobState:
    return JobState(job_id=f"j{start}", run_id="r", status=JobStatus.done, started_at=start, finished_at=end)


def test_busy_fraction_is_the_union_of_the_jobs_within_the_run() -> None:
    jobs = [_job(1.0, 3.0), _job(2.0, 4.0), _job(8.0, 12.0), _job(None, None)]
    assert bench.busy_fraction(jobs, 0.0, 10.0) == pytest.approx((3.0 + 2.0) / 10.0)
    assert bench.busy_fraction([], 0.0, 10.0) == 0.0


def test_echo_steps_stay_within_the_schema() -> None:
    assert bench.echo_steps(1.0, 0.05) == 20
    assert bench.echo_steps(0.0, 0.05) == 1
    assert bench.echo_steps(1e6, 0.05) == bench.MAX_STEPS


def _made_up(total: float, cpu: float, **parts: float) -> dict:
    full = {p: 0.0 for p in (*bench.PARTS, "other")} | parts
    return {
        "total_s": total,
        "cpu_s": cpu,
        "parts_s": full,
        "link_s": sum(full[p] for p in bench.LINK_PARTS),
        "delivery": {"asked": 8, "on_time": 8, "late": 0, "never": 0, "skipped_backpressure": 0},
        "images_generated": 8,
    }


def test_the_figures_are_per_round_ratios_to_real_only_and_their_medians() -> None:
    rounds = [
        {
            "real": _made_up(100.0, 90.0),
            "nonblocking": _made_up(100.0 + d, 91.0, eval_val=d - 1.0, fold=0.5, final_wait=0.5),
            "real_busy": _made_up(110.0, 95.0) | {"backlog_left": 3},
            "nonblocking_cpu": _made_up(105.0, 92.0) | {"generator_busy_fraction": 0.5},
        }
        for d in (2.0, 4.0, 9.0)
    ]
    slow = {"nonblocking": _made_up(150.0, 92.0, final_wait=40.0)}
    r = bench.summarize(rounds, slow)
    assert r["total_ratio_nonblocking_rounds"] == pytest.approx([1.02, 1.04, 1.09])
    assert r["total_ratio_nonblocking"] == pytest.approx(1.04)
    assert r["stall_ratio_nonblocking"] == pytest.approx(1.01)  # fold + final wait: 1 s of 100
    assert r["nonblocking_extra_share"]["eval_val"] == pytest.approx(0.03)
    assert r["corun_slowdown"] == pytest.approx(1.1) and r["corun_backlog_left"] == [3, 3, 3]
    assert r["total_ratio_nonblocking_cpu_generator_expected"] == pytest.approx(1.04 * 1.05)
    assert r["slow"]["nonblocking"]["total_ratio"] == pytest.approx(1.5)
    assert r["slow"]["nonblocking"]["final_wait_s"] == 40.0


@pytest.mark.slow
def test_a_short_bench_runs_every_arm_and_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    small = [
        "data.train_subset=200",
        "data.val_size=50",
        "data.test_subset=100",
        "data.image_size=16",
        "train.batch_size=50",
        "generation.options.output_size=null",
        "generation.options.bank_sample=16",
    ]
    argv = ["--repeats", "1", "--epochs", "4", "--images", "2", "--cpu-steps", "2", "--out", "out.json"]
    assert bench.main(argv + [f"--set={s}" for s in small]) == 0
    r = json.loads((tmp_path / "out.json").read_text())
    (runs,) = r["rounds"]
    assert set(runs) == set(bench.ARMS)
    assert r["setup"]["generators_pinned"] is (len(CORES) > 1)
    for arm in ("nonblocking", "nonblocking_cpu"):  # 2 generation epochs of 2 images
        assert runs[arm]["delivery"]["asked"] == 4 and runs[arm]["images_generated"] == 4
    for arm in ("real", "real_busy"):
        assert runs[arm]["images_generated"] == 0 and runs[arm]["delivery"]["asked"] == 0
    assert runs["real_busy"]["backlog_left"] > 0  # the other core generated the whole run
    assert 0.0 < runs["nonblocking_cpu"]["generator_busy_fraction"] < 1.0
    slow = r["slow"]["nonblocking"]
    assert (
        slow["delivery"]["asked"]
        == slow["delivery"]["on_time"] + slow["delivery"]["late"] + slow["delivery"]["never"]
    )
    assert slow["final_wait_s"] > 0.0  # it could not keep up: the trainer waited at mid-training
    assert "GPU-like generator" in bench.table(r) and "cannot keep up" in bench.table(r)
