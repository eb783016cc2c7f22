"""The ablation's summaries and its table (OUT/table.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actgen_lab.arms import BASELINES, baseline_of
from actgen_lab.stats import PairedDiff, mean_std, paired_difference

# ----------------------------------------------------------------------- summaries
TABLE_NAME = "table.md"


@dataclass
class ArmSummary:
    """One arm over its seeds."""

    arm: str
    seeds: list[int]
    acc_mean: float
    acc_std: float
    images: float
    seconds: float
    vs: dict[str, PairedDiff | None]
    hardness: float | None
    diversity: float | None
    faithfulness: float | None
    # a testbed's own figures: (mean, std) over seeds per key, and worst-group paired differences
    extra: dict[str, tuple[float, float]] = field(default_factory=dict)
    worst_vs: dict[str, PairedDiff | None] = field(default_factory=dict)


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarize(cells: list[dict[str, Any]]) -> list[ArmSummary]:
    """Per arm, in table order: mean +- std, paired differences against the baselines, diagnostics."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for cell in cells:
        by_arm.setdefault(cell["arm"], {})[cell["seed"]] = cell
    acc = {arm: {s: c["test_acc"] for s, c in seeds.items()} for arm, seeds in by_arm.items()}
    worst = {
        arm: {
            s: c["extra"]["worst_group_accuracy"]
            for s, c in seeds.items()
            if "worst_group_accuracy" in c.get("extra", {})
        }
        for arm, seeds in by_arm.items()
    }
    rows = []
    for arm, seeds in by_arm.items():
        mean, std = mean_std(list(acc[arm].values()))
        extra: dict[str, tuple[float, float]] = {}
        for key in dict.fromkeys(k for c in seeds.values() for k in c.get("extra", {})):
            values = [c["extra"][key] for c in seeds.values() if c.get("extra", {}).get(key) is not None]
            if values:
                extra[key] = mean_std(values)
        rows.append(
            ArmSummary(
                arm=arm,
                seeds=sorted(seeds),
                acc_mean=mean,
                acc_std=std,
                images=float(np.mean([c["images_generated"] for c in seeds.values()])),
                seconds=float(np.mean([c["seconds"] for c in seeds.values()])),
                vs={
                    b: paired_difference(acc[arm], acc[o])
                    if (o := baseline_of(arm, b)) in acc and o != arm
                    else None
                    for b in BASELINES
                },
                hardness=_mean_or_none(c["hardness"] for c in seeds.values()),
                diversity=_mean_or_none(c["diversity"] for c in seeds.values()),
                faithfulness=_mean_or_none(c["faithfulness"] for c in seeds.values()),
                extra=extra,
                worst_vs={
                    b: paired_difference(worst[arm], worst[o])
                    if worst[arm] and (o := baseline_of(arm, b)) in worst and o != arm
                    else None
                    for b in BASELINES
                },
            )
        )
    return rows


def pp_interval(diff: PairedDiff | None) -> str:
    """A paired difference in percentage points: ``+1.23 [-0.40, +2.86]``."""
    if diff is None:
        return "-"
    if diff.low is None or diff.high is None:
        return f"{100 * diff.mean:+.2f} (n=1)"
    return f"{100 * diff.mean:+.2f} [{100 * diff.low:+.2f}, {100 * diff.high:+.2f}]"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _pm(value: tuple[float, float] | None, scale: float = 100.0, fmt: str = ".1f") -> str:
    """``mean ± std`` of a (mean, std) pair, scaled (percent by default); ``-`` when missing or
    nan (a group the test split does not hold, e.g. majority backgrounds on backgrounds-shift)."""
    if value is None or math.isnan(value[0]):
        return "-"
    return f"{format(scale * value[0], fmt)} ± {format(scale * value[1], fmt)}"


def _extra(r: ArmSummary, key: str, fmt: str = ".3f") -> str:
    value = r.extra.get(key)
    return "-" if value is None else format(value[0], fmt)


def testbed_tables(rows: list[ArmSummary]) -> list[tuple[list[str], list[list[str]]]]:
    """The backgrounds testbed's two tables: accuracy by group, and what the images were."""
    accuracy = (
        [
            "arm",
            "seeds",
            "test accuracy % (mean ± std)",
            "Δ vs real, pp [95 % CI]",
            "Δ vs random, pp [95 % CI]",
            "worst-group % (mean ± std)",
            "Δ worst-group vs real, pp [95 % CI]",
            "Δ worst-group vs random, pp [95 % CI]",
            "minority-bg %",
            "majority-bg %",
            "hard-style %",
            "images",
            "s / cell",
        ],
        [
            [
                r.arm,
                str(len(r.seeds)),
                f"{100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f}",
                pp_interval(r.vs["real"]),
                pp_interval(r.vs["random"]),
                _pm(r.extra.get("worst_group_accuracy")),
                pp_interval(r.worst_vs.get("real")),
                pp_interval(r.worst_vs.get("random")),
                _pm(r.extra.get("minority_accuracy")),
                _pm(r.extra.get("majority_accuracy")),
                _pm(r.extra.get("hard_accuracy")),
                f"{r.images:.0f}",
                f"{r.seconds:.0f}",
            ]
            for r in rows
        ],
    )
    images = (
        [
            "arm",
            "hardness at ask: generated / guide",
            "within-guide diversity",
            "repeat share",
            "distance to guide",
            "change inside / outside digit",
            "faithfulness",
            "eq. 8 mask IoU / attention IoU",
        ],
        [
            [
                r.arm,
                f"{_extra(r, 'hardness_at_ask', '.2f')} / {_extra(r, 'guide_hardness_at_ask', '.2f')}",
                _extra(r, "guide_diversity"),
                _extra(r, "repeat_share", ".2f"),
                _extra(r, "distance_to_guide"),
                f"{_extra(r, 'change_inside')} / {_extra(r, 'change_outside')}",
                _extra(r, "faithfulness", ".2f")
                if "faithfulness" in r.extra
                else _num(r.faithfulness, ".2f"),
                f"{_extra(r, 'mask_iou', '.2f')} / {_extra(r, 'attention_iou', '.2f')}",
            ]
            for r in rows
            if r.images
        ],
    )
    return [accuracy, images]


TESTBED_NOTE = (
    "Δ: mean over seeds of (arm - baseline), paired by seed, 95 % t-interval (an oracle arm's "
    "random is oracle-random). Test accuracy on the whole test split; worst-group: the lowest "
    "accuracy of the four groups, background (majority/minority) x style (common/hard); "
    "minority-bg / majority-bg: test images whose background is not / is their class's majority "
    "kind in training; hard-style: test images in their class's hard style. hardness at ask: cross-entropy under the classifier "
    "of the epoch that asked for the image, of the generated image / of its guide; within-guide "
    "diversity: mean pairwise RMS pixel distance between the images of one guide; repeat share: "
    "images whose guide had guided an earlier one; change inside / outside: mean absolute pixel "
    "change from the guide inside / outside the guide's true digit mask; faithfulness: share the "
    "reference CNN reads as their class; eq. 8 mask IoU: IoU with the true digit mask of the mask "
    "eq. 8 applies (cut at 0.5), attention IoU: of the min-max normalised attention sum."
)


def table_rows(rows: list[ArmSummary]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells, shared by table.md and index.html."""
    header = [
        "arm",
        "seeds",
        "test accuracy % (mean ± std)",
        "Δ vs real, pp [95 % CI]",
        "Δ vs random, pp [95 % CI]",
        "images",
        "s / cell",
        "hardness",
        "diversity",
        "faithfulness",
    ]
    body = [
        [
            r.arm,
            str(len(r.seeds)),
            f"{100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f}",
            pp_interval(r.vs["real"]),
            pp_interval(r.vs["random"]),
            f"{r.images:.0f}",
            f"{r.seconds:.0f}",
            _num(r.hardness),
            _num(r.diversity),
            _num(r.faithfulness, ".2f"),
        ]
        for r in rows
    ]
    return header, body


def _is_testbed(results: dict[str, Any]) -> bool:
    return results.get("setup", {}).get("testbed", "digits") != "digits"


def _setup_line(results: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    setup, ref = results.get("setup", {}), results.get("reference", {})
    total = sum(c["seconds"] for c in cells)
    given = "".join(f" `--set {o}`" for o in setup.get("overrides", []))
    head = (
        f"Config `{setup.get('config')}`{given}; generator `{setup.get('model')}`; {setup.get('cpus')} CPUs, {setup.get('torch_threads')} torch "
        f"thread(s) per process, torch {setup.get('torch')}; {len(cells)} cells, {total / 60:.1f} min of "
        f"cell time."
    )
    if _is_testbed(results):
        test = ref.get("reference_test", {})
        return (
            f"{head} Reference CNN on the {ref.get('test_images')} real test images: "
            f"{test.get('accuracy', math.nan):.3f} (worst group {test.get('worst_group_accuracy', math.nan):.3f}); "
            f"a uniform mask's IoU with the digit: {ref.get('uniform_mask_iou', math.nan):.3f}."
        )
    return (
        f"{head} Reference classifier: {ref.get('test_accuracy', math.nan):.3f} on the real test "
        f"split; real same-class diversity {_num(ref.get('real_diversity'))}."
    )


def _markdown(header: list[str], body: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in body),
    ]


def _title(results: dict[str, Any]) -> str:
    return f"Ablation on {results.get('setup', {}).get('title', 'the digits (low data)')}"


def write_table(out: Path, cells: list[dict[str, Any]], results: dict[str, Any]) -> Path:
    """OUT/table.md: mean ± std per arm and paired differences (by seed) against real and random."""
    rows = summarize(cells)
    lines = [f"# {_title(results)}", "", _setup_line(results, cells), ""]
    if _is_testbed(results):
        for header, body in testbed_tables(rows):
            lines += [*_markdown(header, body), ""]
        lines += [TESTBED_NOTE, ""]
    else:
        lines += _markdown(*table_rows(rows))
        lines += [
            "",
            "Δ: mean over seeds of (arm - baseline) test accuracy, paired by seed, with a 95 % "
            "t-interval. hardness: the final classifier's mean cross-entropy on the arm's generated "
            "images; diversity: mean pairwise RMS pixel distance between generated images of one class; "
            "faithfulness: share of generated images the reference classifier reads as their class.",
            "",
        ]
    path = out / TABLE_NAME
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
