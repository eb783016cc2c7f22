"""Paired differences between two arms of a finished ablation (docs/ablation.md 6).

The ablation's table pairs every arm with ``real`` and ``random`` only; the predictions compare arms
with each other (aig with ig, actgen with aig, ...). This reads ``results.json`` and prints, for each
pair ``a-b``, the mean over the seeds both have of (a - b) with its 95 % t-interval
(:func:`actgen_lab.stats.paired_difference`), for the accuracies (pp) and the diagnostics.

    actgen-lab pairs runs/ablation-backgrounds aig-ig actgen-aig
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from actgen_lab.ablation import RESULTS_NAME
from actgen_lab.stats import paired_difference

# (key, scale, format): accuracies and faithfulness in percentage points, the rest as measured
FIGURES = (
    ("test_acc", 100.0, ".2f"),
    ("worst_group_accuracy", 100.0, ".2f"),
    ("minority_accuracy", 100.0, ".2f"),
    ("hard_accuracy", 100.0, ".2f"),
    ("faithfulness", 100.0, ".2f"),
    ("hardness_at_ask", 1.0, ".3f"),
    ("guide_diversity", 1.0, ".3f"),
    ("change_inside", 1.0, ".3f"),
    ("change_outside", 1.0, ".3f"),
    ("mask_iou", 1.0, ".3f"),
)
DEFAULT_PAIRS = (
    # the oracle (docs/ablation.md 7)
    "oracle-random-real",
    "oracle-ig-oracle-random",
    "oracle-aig-oracle-ig",
    "oracle-aig+contrastive-oracle-aig",
    "oracle-aig+adversarial-oracle-aig",
    "oracle-actgen-oracle-aig",
    "oracle-guides-oracle-ig",
    "oracle-aig-unmined-oracle-aig",
    "oracle-random-uniform-oracle-random",
    # the diffusion arms
    "ig-random",
    "aig-ig",
    "aig-unnormalised-aig",
    "aig+contrastive-aig",
    "aig+adversarial-aig",
    "actgen-aig",
    "actgen-ig",
    "focal-real",
    "released-actgen",
    "paper-actgen",
    "paper-aig",
    "released-ig",
    "actgen-async-actgen",
    "ours-actgen",
)


def figure(cell: dict[str, Any], key: str) -> float | None:
    """One figure of a cell: top level (test_acc, faithfulness) or among the testbed's extras."""
    value = cell.get(key) if key in ("test_acc", "faithfulness") else cell.get("extra", {}).get(key)
    return None if value is None else float(value)


def split_pair(text: str, arms: set[str]) -> tuple[str, str]:
    """``a-b`` -> (a, b), where arm names may contain '-' themselves."""
    for i, char in enumerate(text):
        if char == "-" and text[:i] in arms and text[i + 1 :] in arms:
            return text[:i], text[i + 1 :]
    raise SystemExit(f"{text!r} is not two arms of this ablation joined by '-' ({', '.join(sorted(arms))})")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``actgen-lab pairs``."""
    parser = sub.add_parser(
        "pairs",
        help="paired differences between arms of an ablation's results.json (95 %% t-intervals)",
        description=(__doc__ or "").splitlines()[0],
    )
    parser.add_argument("out", type=Path, help="the ablation's output folder (its results.json)")
    parser.add_argument("pairs", nargs="*", help="a-b: arm a minus arm b (default: the doc's pairs present)")
    parser.add_argument("--first-seed", type=int, default=0, help="only seeds from this one")
    parser.add_argument("--seeds", type=int, default=None, help="only seeds below this")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print each pair's paired differences."""
    results = json.loads((args.out / RESULTS_NAME).read_text())
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for cell in results["cells"]:
        if cell["seed"] >= args.first_seed and (args.seeds is None or cell["seed"] < args.seeds):
            cells.setdefault(cell["arm"], {})[cell["seed"]] = cell
    print("seeds:", ", ".join(f"{arm} {len(seeds)}" for arm, seeds in cells.items()))
    pairs = args.pairs or [p for p in DEFAULT_PAIRS if _known(p, set(cells))]
    for text in pairs:
        a, b = split_pair(text, set(cells))
        parts = []
        for key, scale, fmt in FIGURES:
            values = [
                {s: v for s, c in cells[arm].items() if (v := figure(c, key)) is not None} for arm in (a, b)
            ]
            diff = paired_difference(values[0], values[1])
            if diff is None or diff.low is None or diff.high is None:
                continue
            parts.append(
                f"{key} {scale * diff.mean:+{fmt}} [{scale * diff.low:+{fmt}}, {scale * diff.high:+{fmt}}]"
            )
        print(f"{a} - {b} (n={len(set(cells[a]) & set(cells[b]))}): " + "; ".join(parts))
    return 0


def _known(text: str, arms: set[str]) -> bool:
    try:
        split_pair(text, arms)
    except SystemExit:
        return False
    return True
