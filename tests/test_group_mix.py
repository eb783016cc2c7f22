"""``actgen-lab groups``: a backgrounds ablation's pairs by group and under other test mixes
(docs/ablation.md 8.8), on a results.json written by hand so every figure can be checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actgen_lab import cli
from actgen_lab.group_mix import GROUPS, best_mix, group_accuracies, mix, paired_at, simplex_grid

# two arms, three seeds: b gains 12 pp on minority/common only, a 8 pp on majority/hard only
BASE = np.array([0.70, 0.30, 0.40, 0.10])


def _cell(arm: str, seed: int, groups: np.ndarray) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "test_acc": float(groups.mean()),
        "extra": {f"group/{g}": float(v) for g, v in zip(GROUPS, groups, strict=True)},
    }


def _results(tmp_path):
    noise = [0.0, 0.01, -0.01]
    cells = [_cell("real", s, BASE + n) for s, n in enumerate(noise)]
    cells += [_cell("b", s, BASE + n + [0, 0.12, 0, 0]) for s, n in enumerate(noise)]
    cells += [_cell("a", s, BASE + n + [0, 0.12, 0.08, 0]) for s, n in enumerate(noise)]
    cells.append({"arm": "a", "seed": 7, "test_acc": 0.5, "extra": {}})  # no groups: left out
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    return cells


def test_each_group_and_each_mix_by_hand(tmp_path) -> None:
    acc = group_accuracies(_results(tmp_path))
    assert sorted(acc["a"]) == [0, 1, 2]  # the cell without groups is not one
    for g, gain in enumerate([0.0, 0.0, 8.0, 0.0]):
        d = paired_at(acc, "a", "b", np.eye(4)[g])
        assert d is not None and 100 * d.mean == pytest.approx(gain) and 100 * d.low == pytest.approx(gain)
    assert mix(0.5, 0.5) == pytest.approx(np.full(4, 0.25))
    assert mix(0.25, 0.6) == pytest.approx([0.3, 0.1, 0.45, 0.15]) and mix(0.25, 0.6).sum() == pytest.approx(
        1
    )
    even = paired_at(acc, "b", "real", mix(0.5, 0.5))
    assert even is not None and 100 * even.mean == pytest.approx(3.0)  # 12 pp in one group of four
    assert group_accuracies(_results(tmp_path), first=1, below=2)["a"].keys() == {1}


def test_the_best_mix_lifts_the_smallest_effect() -> None:
    assert len(simplex_grid(4)) == 35  # C(4 + 3, 3)
    assert np.allclose(simplex_grid(4).sum(1), 1)
    weights, value = best_mix(np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0]]))
    assert weights == pytest.approx([0.5, 0.5, 0, 0]) and value == pytest.approx(2.0)
    _, value = best_mix(np.array([[1.0, -1.0, 0, 0], [-3.0, 3.0, 0, 0]]))
    assert value == pytest.approx(0.0)  # opposed effects: no mix puts both above 0


def test_the_command_prints_groups_mixes_and_names_what_is_wrong(tmp_path, capsys) -> None:
    _results(tmp_path)
    assert cli.main(["groups", str(tmp_path), "b-real", "a-b"]) == 0
    out = capsys.readouterr().out
    assert "b - real, pp by group: majority/common +0.00 [+0.00, +0.00]; minority/common +12.00" in out
    assert "minority 0.5, hard style 0.5: b - real +3.00 [+3.00, +3.00]; a - b +2.00 [+2.00, +2.00]" in out
    assert "(smallest +4.80 pp)" in out  # 12 w = 8 (1 - w): w = 0.4 on minority/common
    with pytest.raises(SystemExit, match="'a-c' is not two arms"):
        cli.main(["groups", str(tmp_path), "a-c"])
    with pytest.raises(SystemExit, match="--minority must be in"):
        cli.main(["groups", str(tmp_path), "a-b", "--minority", "2"])
    (tmp_path / "results.json").write_text(json.dumps({"cells": [{"arm": "a", "seed": 0, "extra": {}}]}))
    with pytest.raises(SystemExit, match="reports group accuracies"):
        cli.main(["groups", str(tmp_path), "a-b"])


def test_the_testbed_table_pairs_the_worst_group_with_real_and_random() -> None:
    """The worst group (minority/hard in every backgrounds cell so far) is where the oracle's arms
    separate in the paper's order (docs/ablation.md 8.8): the table shows it against both baselines."""
    from actgen_lab.table import summarize, testbed_tables

    worst = {"real": 0.10, "random": 0.14, "ig": 0.155}
    cells = [
        {
            "arm": arm,
            "seed": seed,
            "test_acc": 0.4 + 0.01 * seed,
            "images_generated": 0,
            "seconds": 1.0,
            "hardness": None,
            "diversity": None,
            "faithfulness": None,
            "extra": {
                "worst_group_accuracy": value + 0.01 * seed,
                "majority_accuracy": float("nan"),  # a shifted test split holds no majority background
            },
        }
        for arm, value in worst.items()
        for seed in range(3)
    ]
    header, body = testbed_tables(summarize(cells))[0]
    row = {r[0]: dict(zip(header, r, strict=True)) for r in body}
    assert row["random"]["Δ worst-group vs real, pp [95 % CI]"] == "+4.00 [+4.00, +4.00]"
    assert row["ig"]["Δ worst-group vs random, pp [95 % CI]"] == "+1.50 [+1.50, +1.50]"
    assert row["random"]["Δ worst-group vs random, pp [95 % CI]"] == "-"  # not against itself
    assert row["ig"]["majority-bg %"] == "-" and row["ig"]["worst-group % (mean ± std)"] == "16.5 ± 1.0"


def test_pairs_takes_a_range_of_seeds(tmp_path, capsys) -> None:
    """``actgen-lab pairs --first-seed``: seeds run after a reading are read on their own (8.8, 8.10)."""
    _results(tmp_path)
    assert cli.main(["pairs", str(tmp_path), "a-b", "--first-seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "a - b (n=2): test_acc +2.00 [+2.00, +2.00]" in out  # seeds 1 and 2; a's seed 7 has no b
    assert cli.main(["pairs", str(tmp_path), "a-real", "--first-seed", "1", "--seeds", "2"]) == 0
    assert "a - real (n=1)" in capsys.readouterr().out
