"""What a backgrounds ablation's comparisons say group by group and under another test mix
(docs/ablation.md 8.8).

The backgrounds test split is four groups of about a quarter each (majority/minority background x
common/hard style) and its test accuracy is close to their mean. One arm's gain can sit in one
group and another arm's in another, so whether ``a - b`` clears a bar can depend on the mix the
test split happens to have. From each cell's four group accuracies this prints, for each pair:

* its paired difference in each group;
* the paired difference under mixes with another hard-style share (the minority share fixed, the
  two stressors independent, as the test split draws them);
* over every mix of the four groups (a grid over the simplex), the one that makes the smallest of
  the pairs' mean differences largest, and the pairs there.

    actgen-lab groups runs/ablation-backgrounds oracle-random-real oracle-ig-oracle-random
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from actgen_lab.ablation import RESULTS_NAME
from actgen_lab.backgrounds import GROUPS
from actgen_lab.pairs import split_pair
from actgen_lab.stats import PairedDiff, paired_difference
from actgen_lab.table import pp_interval

HARD_SHARES = (0.25, 0.4, 0.5, 0.6, 0.75)
GRID_STEPS = 100  # the simplex grid: weights in steps of 1/100


def group_accuracies(cells: list[dict[str, Any]], first: int = 0, below: int | None = None):
    """arm -> seed -> its four group accuracies (GROUPS' order), for cells that report them."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for cell in cells:
        extra = cell.get("extra") or {}
        if cell["seed"] < first or (below is not None and cell["seed"] >= below):
            continue
        if all(f"group/{g}" in extra for g in GROUPS):
            out.setdefault(cell["arm"], {})[cell["seed"]] = np.array([extra[f"group/{g}"] for g in GROUPS])
    return out


def mix(minority: float, hard: float) -> np.ndarray:
    """The four groups' weights when a test image is on a minority background with probability
    ``minority`` and in the hard style with probability ``hard``, independently."""
    return np.array(
        [(1 - minority) * (1 - hard), minority * (1 - hard), (1 - minority) * hard, minority * hard]
    )


def paired_at(
    acc: dict[str, dict[int, np.ndarray]], a: str, b: str, weights: np.ndarray
) -> PairedDiff | None:
    """a - b in the accuracy the mix ``weights`` gives, paired by seed."""
    scores = [{s: float(v @ weights) for s, v in acc[arm].items()} for arm in (a, b)]
    return paired_difference(scores[0], scores[1])


def simplex_grid(steps: int = GRID_STEPS) -> np.ndarray:
    """Every mix of four weights in multiples of 1/steps that sum to 1 (rows)."""
    rows = [
        (i, j, k, steps - i - j - k)
        for i, j, k in itertools.product(range(steps + 1), repeat=3)
        if i + j + k <= steps
    ]
    return np.array(rows, dtype=np.float64) / steps


def best_mix(effects: np.ndarray, steps: int = GRID_STEPS) -> tuple[np.ndarray, float]:
    """The mix (of the grid) whose smallest pair effect is largest, and that effect: ``effects`` is
    pairs x 4, each pair's mean difference in each group."""
    grid = simplex_grid(steps)
    worst = (grid @ effects.T).min(1)
    best = int(np.argmax(worst))
    return grid[best], float(worst[best])


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``actgen-lab groups``."""
    parser = sub.add_parser(
        "groups",
        help="a backgrounds ablation's paired differences by group and under other test mixes",
        description=(__doc__ or "").splitlines()[0],
    )
    parser.add_argument("out", type=Path, help="the ablation's output folder (its results.json)")
    parser.add_argument("pairs", nargs="+", help="a-b: arm a minus arm b")
    parser.add_argument("--first-seed", type=int, default=0, help="only seeds from this one")
    parser.add_argument("--seeds", type=int, default=None, help="only seeds below this")
    parser.add_argument(
        "--minority", type=float, default=0.5, help="minority-background share of the swept mixes"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print each pair by group, under the swept mixes, and the best mix of the four groups."""
    if not 0.0 <= args.minority <= 1.0:
        raise SystemExit(f"actgen-lab groups: --minority must be in [0, 1], not {args.minority}")
    results = json.loads((args.out / RESULTS_NAME).read_text())
    acc = group_accuracies(results["cells"], args.first_seed, args.seeds)
    if not acc:
        raise SystemExit(f"actgen-lab groups: no cell in {args.out / RESULTS_NAME} reports group accuracies")
    pairs = [split_pair(text, set(acc)) for text in args.pairs]
    print("seeds:", ", ".join(f"{arm} {len(seeds)}" for arm, seeds in acc.items()))
    effects = []
    for a, b in pairs:
        by_group = [paired_at(acc, a, b, np.eye(len(GROUPS))[g]) for g in range(len(GROUPS))]
        effects.append([100.0 * d.mean if d is not None else np.nan for d in by_group])
        print(
            f"{a} - {b}, pp by group: "
            + "; ".join(f"{g} {pp_interval(d)}" for g, d in zip(GROUPS, by_group, strict=True))
        )
    for hard in HARD_SHARES:
        weights = mix(args.minority, hard)
        print(
            f"minority {args.minority:g}, hard style {hard:g}: "
            + "; ".join(f"{a} - {b} {pp_interval(paired_at(acc, a, b, weights))}" for a, b in pairs)
        )
    weights, value = best_mix(np.array(effects))
    print(
        "the mix that makes the smallest mean difference largest: "
        + ", ".join(f"{g} {w:.2f}" for g, w in zip(GROUPS, weights, strict=True))
        + f" (smallest {value:+.2f} pp): "
        + "; ".join(f"{a} - {b} {pp_interval(paired_at(acc, a, b, weights))}" for a, b in pairs)
    )
    return 0
