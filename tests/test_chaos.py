"""The short `make chaos` (bench/chaos.py): three replicas and an AOF Redis under every kind of
fault (SIGKILL, SIGTERM, SIGSTOP past the lease, Redis restart) while a client posts jobs; then
nothing lost, nothing doubled, nothing stuck, and Redis under its memory bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from chaos import FAULTS, run_chaos  # noqa: E402

pytestmark = pytest.mark.slow


def test_short_chaos_run_loses_doubles_and_strands_nothing() -> None:
    report = run_chaos(75, replicas=3, seed=1, fault_every_s=(1.0, 2.5), drain_s=180)
    assert report["findings"] == {
        "lost": 0,
        "duplicated": 0,
        "stuck": 0,
        "failed_without_reason": 0,
        "memory_over_bound": 0,
    }, report
    assert set(report["faults"]) == set(FAULTS) and report["faults_total"] >= 8, report["faults"]
    assert report["jobs"] >= 30 and report["pending"] == 0
    assert report["redelivered"] >= 1, "no fault took a job over: the run did not test reclaim"
    assert report["ok"]
