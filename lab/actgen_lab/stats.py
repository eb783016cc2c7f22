"""The ablation's statistics: mean and spread over seeds, paired differences with t-intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else 0.0)


@dataclass(frozen=True)
class PairedDiff:
    """Mean of arm - baseline over the seeds both have, with a t-interval (None for n < 2)."""

    n: int
    mean: float
    low: float | None
    high: float | None


def paired_difference(
    arm: dict[int, float], base: dict[int, float], level: float = 0.95
) -> PairedDiff | None:
    """Paired by seed: d_s = arm[s] - base[s]; mean(d) +- t_{(1+level)/2, n-1} sd(d) / sqrt(n)."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return None
    diffs = np.array([arm[s] - base[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return PairedDiff(len(diffs), mean, None, None)
    from scipy.stats import t  # scipy comes with scikit-learn

    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    return PairedDiff(len(diffs), mean, mean - half, mean + half)
