"""The ablation harness: its statistics by hand, its CLI errors, and a miniature grid end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from actgen_lab import ablation
from actgen_lab.ablation import mean_std, paired_difference
from actgen_lab.cli import main
from actgen_shared.presets import read_model_defaults, resolve_options
from actgen_shared.schemas import GenerationOptions

REPO = Path(__file__).resolve().parents[1]
T_975_DF1 = 12.706204736174698  # Student t, 97.5 % quantile, 1 degree of freedom (tables)
T_975_DF2 = 4.302652729749464  # ... 2 degrees of freedom


def test_mean_and_sample_std_by_hand() -> None:
    mean, std = mean_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(math.sqrt((0.02**2 + 0.0 + 0.02**2) / 2))  # ddof 1
    assert mean_std([0.5]) == (0.5, 0.0)


def test_paired_difference_is_paired_by_seed_with_a_t_interval() -> None:
    arm = {0: 0.95, 1: 0.93, 2: 0.97}
    base = {0: 0.94, 1: 0.90, 2: 0.95, 3: 0.99}  # seed 3 has no partner: left out
    diff = paired_difference(arm, base)
    # d = 0.01, 0.03, 0.02: mean 0.02, sd 0.01, half-width t(0.975, 2) * 0.01 / sqrt(3)
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert diff is not None and diff.n == 3
    assert diff.mean == pytest.approx(0.02)
    assert diff.low == pytest.approx(0.02 - half)
    assert diff.high == pytest.approx(0.02 + half)
    # unpaired means would say 0.95 - 0.945 = 0.005: pairing is what the table reports
    one = paired_difference({0: 0.9}, {0: 0.8, 1: 0.7})
    assert one is not None and one.n == 1 and one.mean == pytest.approx(0.1) and one.low is None
    assert paired_difference({0: 0.9}, {1: 0.8}) is None


def test_unknown_arm_and_bad_seeds_are_named_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ablate", "--arms", "real,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown arm 'bogus'" in err and "actgen" in err  # names the bad one and the known ones
    assert main(["ablate", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


def test_every_arm_is_a_valid_config() -> None:
    for arm in ablation.ARMS:
        cfg = ablation.cell_config(REPO / ablation.DEFAULT_CONFIG, [], arm, 3, Path("/tmp/x"))
        assert cfg.seed == 3 and cfg.generation.sync
    mine = ablation.cell_config(REPO / ablation.DEFAULT_CONFIG, [], "actgen+lowconf", 0, Path("/tmp/x"))
    assert mine.generation.selection == "lowest_confidence"


def test_the_digits_arms_run_on_the_digits_models_own_defaults() -> None:
    """The arms keep their meaning when the service's defaults change: they name no preset, so the
    digits model's defaults file decides what an arm does not set (and the text's schedule)."""
    digits = read_model_defaults(REPO / ablation.DEFAULT_MODEL)

    def resolved(arm: str):
        gen = ablation.cell_config(REPO / ablation.DEFAULT_CONFIG, [], arm, 0, Path("/tmp/x")).generation
        options = GenerationOptions.model_validate({**gen.options, **gen.section_options})
        return gen, resolve_options(options, digits)

    gen, actgen = resolved("actgen")
    assert gen.preset is None and gen.schedule.value == "paper" and actgen.defaults == "model"
    assert (actgen.lr, actgen.guidance_scale, actgen.grad_norm, actgen.normalize_mask) == (
        0.01,
        15.0,
        "token",
        True,
    )
    _, nu = resolved("actgen-nu0.05")
    assert nu.model_dump(exclude={"lr"}) == actgen.model_dump(exclude={"lr"}) and nu.lr == 0.05
    _, text = resolved("actgen-global")
    assert (text.grad_norm, text.update_uncond, text.lr) == ("global", False, 0.05)
    gen, released = resolved("actgen-released")
    assert (
        released.defaults == "released" and released.guidance_scale == 7.5 and gen.schedule.value == "authors"
    )


# A grid small enough for the suite: 4 epochs (jobs after epochs 0 and 1), 3 images a job, 4 steps.
MINI = [
    "train.epochs=4",
    "generation.images_per_epoch=3",
    "generation.options.num_inference_steps=4",
    "generation.options.grad_steps=1",
    "data.test_subset=120",
]


def _jsonl(path: Path) -> list[dict]:
    """A JSON-lines file's rows; none when it does not exist (a real run generates nothing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cells(out: Path) -> dict[tuple[str, int], dict]:
    cells = json.loads((out / "results.json").read_text())["cells"]
    return {(c["arm"], c["seed"]): c for c in cells}


@pytest.mark.slow
def test_miniature_grid_end_to_end_and_resumable(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    run = lambda arms, seeds: ablation.run_ablation(  # noqa: E731
        config=REPO / "configs" / "ablation.yaml",
        arms=arms,
        seeds=seeds,
        out=out,
        overrides=MINI,
        model=REPO / "models" / "tiny-digits",
        progress=False,
        log=lambda _: None,
    )

    first = run(["real", "aig"], 1)
    assert first.ran == [("real", 0), ("aig", 0)] and first.skipped == []
    cells = _cells(out)
    for cell in cells.values():  # results.json agrees with each cell's own files
        run_dir = out / cell["run_dir"]
        metrics = _jsonl(run_dir / "metrics.jsonl")
        assert len(metrics) == 4
        assert cell["test_acc"] == metrics[-1]["test_acc"]
        assert cell["images_asked"] == sum(m["posted"] for m in metrics)
        assert cell["images_generated"] == len(_jsonl(run_dir / "generated" / "index.jsonl"))
        assert cell["seconds"] > 0
    real, aig = cells[("real", 0)], cells[("aig", 0)]
    assert real["images_generated"] == 0 and real["hardness"] is None
    assert aig["images_generated"] == aig["images_asked"] == 6  # sync: every asked image arrived
    assert aig["hardness"] >= 0 and 0 < aig["diversity"] < 1 and 0 <= aig["faithfulness"] <= 1
    assert aig["examples"] and all((out / e["generated"]).exists() for e in aig["examples"])

    table = (out / "table.md").read_text()
    assert (
        f"| aig | 1 | {100 * aig['test_acc']:.2f} ± 0.00 | "
        f"{100 * (aig['test_acc'] - real['test_acc']):+.2f} (n=1) |" in table
    )
    page = (out / "index.html").read_text()
    assert "<svg" in page and "data:image/png;base64," in page
    assert 'src="http' not in page and "<link" not in page  # self-contained

    # a rerun skips finished cells; a half-finished cell (a folder, no result) is redone from scratch
    half = out / "cells" / "real-seed1"
    half.mkdir(parents=True)
    (half / "stale.txt").write_text("killed here")
    second = run(["real", "focal"], 2)
    assert second.skipped == [("real", 0)]
    assert second.ran == [("real", 1), ("focal", 0), ("focal", 1)]
    assert not (half / "stale.txt").exists() and len(_jsonl(half / "metrics.jsonl")) == 4
    cells = _cells(out)
    assert cells[("real", 0)] == real and cells[("aig", 0)] == aig  # untouched, and still reported

    # the paired difference of the table, by hand: focal - real on seeds 0 and 1
    d = [cells[("focal", s)]["test_acc"] - cells[("real", s)]["test_acc"] for s in (0, 1)]
    mean, sd = (d[0] + d[1]) / 2, abs(d[0] - d[1]) / math.sqrt(2)
    half_width = T_975_DF1 * sd / math.sqrt(2)
    row = next(line for line in (out / "table.md").read_text().splitlines() if line.startswith("| focal |"))
    assert f"{100 * mean:+.2f} [{100 * (mean - half_width):+.2f}, {100 * (mean + half_width):+.2f}]" in row
    assert "| aig | 1 |" in (out / "table.md").read_text()
