"""``actgen-lab ablate`` (``make ablation``): what each part of ActGen buys, on a testbed.

Two testbeds (:data:`TESTBEDS`, ``--testbed``): the low-data ``digits`` (the 8x8 digits, where
every guided arm ties plain generation: docs/ablation.md says why), and ``backgrounds``
(``make ablation TESTBED=backgrounds``): the digits on procedural backgrounds correlated with the
class in training and random in test, a generator trained on every digit on every background,
and diagnostics that see what each mechanism did (:mod:`actgen_trainer.testbed`). Each testbed has
its own config, generator model, output folder and arm table; what follows holds for both.

Paper Table 4 in a low-data setting a CPU runs in minutes: every arm of :data:`ARMS` x every
seed is one *cell*, a full run of the real :class:`~actgen_trainer.loop.Trainer` on
``configs/ablation.yaml`` plus the arm's overrides, in its own folder under ``OUT/cells/``.
Runs wait for their images (``sync``), so a seed fixes the real subset, the initialisation and
all generator noise: the arms are paired by seed, and the table reports the paired difference
against ``real`` and ``random`` with a 95 % t-interval.

One private redis-server and one generator replica (the shipped digits model) serve all cells,
started only when a cell that generates is left to run. ``OUT/results.json`` is rewritten
atomically after every cell; a rerun skips the cells it holds (for the same config) and redoes a
half-finished cell from scratch. ``OUT/table.md`` and ``OUT/index.html`` are rebuilt from it.
A cell is "the same" when its config, torch threads and generator model folder are: after changing
the generator's code, start over in a fresh ``--out``.

Diagnostics of each digits cell's generated images: *hardness*, the final classifier's mean
cross-entropy on them; *diversity*, the mean pairwise RMS pixel distance between generated
images of one class; *faithfulness*, the share that a reference classifier (an RBF SVM on 8x8
grey levels, trained here on the real digits training split) reads as the labelled class.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actgen_lab.arms import (
    ARMS,
    ARMS_BACKGROUNDS,
    BASELINES,
    DEFAULT_CONFIG,
    DEFAULT_MODEL,
    DEFAULT_OUT,
    DEFAULT_SEEDS,
    DEFAULT_THREADS,
    TESTBEDS,
    Testbed,
    check_seeds,
    config_overrides,
    oracle_policy,
    parse_arms,
    testbed_named,
)
from actgen_lab.diagnostics import Diagnostics, testbed_diagnostics
from actgen_lab.oracle import VAE_POLICIES
from actgen_lab.page import PAGE_NAME, write_page
from actgen_lab.stats import PairedDiff, mean_std, paired_difference
from actgen_lab.table import TABLE_NAME, summarize, write_table
from actgen_shared.presets import read_model_defaults, resolve_options
from actgen_shared.schemas import GenerationOptions
from actgen_trainer.config import Config, TrainMode, load_config
from actgen_trainer.demo import _in_repo
from actgen_trainer.loop import Trainer

__all__ = [
    "ARMS",
    "ARMS_BACKGROUNDS",
    "BASELINES",
    "DEFAULT_CONFIG",
    "DEFAULT_MODEL",
    "DEFAULT_OUT",
    "DEFAULT_SEEDS",
    "DEFAULT_THREADS",
    "PAGE_NAME",
    "RESULTS_NAME",
    "TABLE_NAME",
    "TESTBEDS",
    "AblationRun",
    "PairedDiff",
    "Testbed",
    "check_seeds",
    "oracle_policy",
    "mean_std",
    "paired_difference",
    "parse_arms",
    "run_ablation",
    "summarize",
    "testbed_named",
    "write_page",
    "write_table",
]

RESULTS_NAME = "results.json"
EXAMPLES_PER_CELL = 6
# Cell settings that do not change what a cell computes (so they do not make its result stale).
_NOT_FINGERPRINTED = ("output_dir", "run_name")
_NOT_FINGERPRINTED_GENERATION = ("generator_url", "api_key", "request_timeout_s", "wait_timeout_s")


def _shown(path: Path) -> str:
    """A path as the page shows it: relative to the repository when inside it."""
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return str(path)


def _slug(arm: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", arm)


def cell_config(
    config: Path,
    overrides: Sequence[str],
    arm: str,
    seed: int,
    out: Path,
    table: Mapping[str, list[str]] = ARMS,
) -> Config:
    """The config of one cell: base file, the user's overrides, the harness's sync (which an arm
    may turn off), the arm's, then the cell's seed and folder."""
    return load_config(
        config,
        [
            *overrides,
            "generation.sync=true",
            *config_overrides(table[arm]),
            f"seed={seed}",
            f"output_dir={out / 'cells'}",
            f"run_name={_slug(arm)}-seed{seed}",
        ],
    )


def fingerprint(cfg: Config, model: str, threads: int, oracle: str | None = None) -> str:
    """A hash of everything that decides a cell's result (not where it is written or served).

    The torch thread count is in it: float sums in another order gave another accuracy (one
    cell: 97.5 % with one thread, 98.6 % with two).
    """
    tree = cfg.model_dump(mode="json")
    for key in _NOT_FINGERPRINTED:
        tree.pop(key)
    for key in _NOT_FINGERPRINTED_GENERATION:
        tree["generation"].pop(key)
    # the options every job gets, defaults resolved (the model's defaults file included): a changed
    # default makes the cell stale
    options = GenerationOptions.model_validate({**cfg.generation.options, **cfg.generation.section_options})
    tree["generation_options"] = options.model_dump(mode="json")
    tree["resolved_options"] = resolve_options(options, read_model_defaults(model)).model_dump(mode="json")
    tree["generator_model"] = Path(model).name if oracle is None else f"oracle:{oracle}"
    if oracle in VAE_POLICIES:  # this oracle reads the model's VAE
        tree["generator_model"] += f":{Path(model).name}"
    tree["torch_threads"] = threads
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _examples(trainer: Trainer, out: Path, count: int = EXAMPLES_PER_CELL) -> list[dict[str, Any]]:
    """A few guide -> generated pairs spread over the run, as paths relative to ``out``."""
    records = trainer.generated.records
    picks = (
        sorted({int(i) for i in np.linspace(0, len(records) - 1, min(count, len(records)))})
        if records
        else []
    )
    pairs = []
    for i in picks:
        r = records[i]
        guide = trainer.run_dir / "guides" / f"{r.guide_id}.png"
        image = trainer.generated.root / r.file
        if guide.exists() and image.exists():
            pairs.append(
                {
                    "guide": str(guide.relative_to(out)),
                    "generated": str(image.relative_to(out)),
                    "class_id": r.class_id,
                    "epoch": r.epoch,
                }
            )
    return pairs


# ----------------------------------------------------------------------- results file
@dataclass
class CellResult:
    """One arm x seed: what results.json keeps of it."""

    arm: str
    seed: int
    fingerprint: str
    test_acc: float
    images_generated: int
    images_asked: int
    seconds: float
    seconds_training: float
    seconds_waiting: float
    hardness: float | None
    diversity: float | None
    faithfulness: float | None
    run_dir: str
    examples: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # a testbed's own figures (backgrounds)


def load_results(out: Path) -> dict[str, Any]:
    """results.json as written so far, or an empty one."""
    path = out / RESULTS_NAME
    if not path.exists():
        return {"cells": []}
    return json.loads(path.read_text(encoding="utf-8"))


def save_results(out: Path, results: dict[str, Any]) -> None:
    """Write results.json atomically: a kill leaves the old file or the new one, never half."""
    path = out / RESULTS_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _finished(results: dict[str, Any], arm: str, seed: int, print_: str) -> dict[str, Any] | None:
    for cell in results["cells"]:
        if cell["arm"] == arm and cell["seed"] == seed and cell["fingerprint"] == print_:
            return cell
    return None


def _store(results: dict[str, Any], cell: CellResult) -> None:
    results["cells"] = [c for c in results["cells"] if not (c["arm"] == cell.arm and c["seed"] == cell.seed)]
    results["cells"].append(asdict(cell))


# ----------------------------------------------------------------------- one cell
def run_cell(cfg: Config, arm: str, print_: str, client: Any, measure: Diagnostics, out: Path) -> CellResult:
    """Run one cell from scratch (its folder is wiped first) and measure it."""
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # a half-finished cell is redone, never continued
    started = time.perf_counter()
    generating = cfg.generation.mode is not TrainMode.real
    trainer = measure.trainer_class(cfg, client=client if generating else None, progress=False)
    summary = trainer.run()
    diag = measure.measure(trainer)
    common = {k: diag.pop(k, None) for k in ("hardness", "diversity", "faithfulness")}
    test_acc = diag.pop("test_acc", summary.test_acc)
    return CellResult(
        arm=arm,
        seed=cfg.seed,
        fingerprint=print_,
        test_acc=test_acc,
        images_generated=summary.images_generated,
        images_asked=int(sum(row.get("posted", 0) for row in trainer.state.metrics)),
        seconds=round(time.perf_counter() - started, 2),
        seconds_training=round(summary.seconds_training, 2),
        seconds_waiting=round(summary.seconds_waiting, 2),
        run_dir=str(cfg.run_dir.relative_to(out)),
        examples=_examples(trainer, out),
        extra=diag,
        **common,
    )


# ----------------------------------------------------------------------- the harness
@dataclass
class AblationRun:
    """What one call of :func:`run_ablation` did."""

    out: Path
    ran: list[tuple[str, int]]
    skipped: list[tuple[str, int]]
    seconds: float


def run_ablation(
    config: str | Path | None = None,
    arms: Sequence[str] | None = None,
    seeds: int | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    model: str | Path | None = None,
    threads: int = DEFAULT_THREADS,
    progress: bool = True,
    log: Callable[[str], None] = print,
    testbed: str = "digits",
) -> AblationRun:
    """Run every unfinished arm x seed cell, then write results.json, table.md and index.html.

    ``config``, ``seeds``, ``out`` and ``model`` default to the testbed's.
    """
    started = time.perf_counter()
    bed = testbed_named(testbed)
    table = bed.arms
    arms = parse_arms(None if arms is None else ",".join(arms), table, bed.default_arms)
    seed_list = check_seeds(bed.seeds if seeds is None else seeds)
    out = Path(bed.out if out is None else out).resolve()
    config = _in_repo(
        str(bed.config if config is None else config)
    )  # the working directory's, else the repo's
    model = str(_in_repo(str(bed.model if model is None else model)))

    # every cell's config is validated before anything starts: a bad override fails in a second
    grid = [
        (arm, seed, cell_config(config, overrides, arm, seed, out, table))
        for arm in arms
        for seed in seed_list
    ]
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    todo: list[tuple[str, int, Config, str]] = []  # (arm, seed, config, fingerprint)
    skipped: list[tuple[str, int, Config, str]] = []
    for arm, seed, cfg in grid:
        print_ = fingerprint(cfg, model, threads, oracle_policy(table[arm]))
        (skipped if _finished(results, arm, seed, print_) else todo).append((arm, seed, cfg, print_))
    results["setup"] = {
        "testbed": bed.name,
        "title": bed.title,
        "config": _shown(config),
        "overrides": list(overrides),
        "model": _shown(Path(model)),
        "arms": dict(table),
        "torch_threads": threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    log(
        f"[ablation] {len(grid)} cells ({len(arms)} arms x {len(seed_list)} seeds): {len(todo)} to run, "
        f"{len(skipped)} already in {out / RESULTS_NAME}"
    )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        measure = testbed_diagnostics(bed, grid[0][2], model)
        results["reference"] = measure.setup()
        ran = _run_cells(todo, results, measure, out, model, threads, progress, log, table)
    finally:
        torch.set_num_threads(threads_before)
    save_results(out, results)
    current = current_cells(results, config, overrides, model, threads, out, table)
    write_table(out, current, results)
    write_page(out, current, results)
    return AblationRun(
        out=out, ran=ran, skipped=[(a, s) for a, s, _, _ in skipped], seconds=time.perf_counter() - started
    )


def _run_cells(
    todo: list[tuple[str, int, Config, str]],
    results: dict[str, Any],
    measure: Diagnostics,
    out: Path,
    model: str,
    threads: int,
    progress: bool,
    log: Callable[[str], None],
    table: Mapping[str, list[str]] = ARMS,
) -> list[tuple[str, int]]:
    """The cells one after another, results.json saved after each; servers only if a cell
    generates through the service (an oracle arm gets an oracle of its own, no server)."""
    from tqdm.auto import tqdm

    ran: list[tuple[str, int]] = []
    with ExitStack() as stack:
        client, url = None, None
        bar = tqdm(todo, disable=not progress, desc="ablation", unit="cell", dynamic_ncols=True)
        for arm, seed, cfg, print_ in bar:
            bar.set_postfix_str(f"{arm} seed {seed}")
            oracle = oracle_policy(table[arm])
            cell_client: Any = client
            cell_url: str | None = url
            if oracle is not None:
                from actgen_lab.oracle import ORACLE_URL, OracleClient
                from actgen_lab.sources import load_split

                split = load_split(cfg.data.dataset)  # the scenes the cell's trainer loads
                vae_model = model if oracle in VAE_POLICIES else None  # through-vae: the cell's model's VAE
                cell_client = OracleClient(policy=oracle, split=split, vae_model=vae_model)
                cell_url = ORACLE_URL
            else:
                if client is None and cfg.generation.mode is not TrainMode.real:
                    client, url = _start_generator(stack, out, model, threads, bar.write if progress else log)
                cell_client, cell_url = client, url
            if cell_url is not None:
                cfg = cfg.model_copy(
                    update={"generation": cfg.generation.model_copy(update={"generator_url": cell_url})}
                )
            cell = run_cell(cfg, arm, print_, cell_client, measure, out)
            _store(results, cell)
            save_results(out, results)
            ran.append((arm, seed))
            message = (
                f"[ablation] {arm} seed {seed}: test {cell.test_acc:.2%} | "
                f"{cell.images_generated} images | {cell.seconds:.0f} s"
            )
            if progress:
                bar.write(message)  # above the bar, not through it
            else:
                log(message)
        bar.close()
    return ran


def _start_generator(
    stack: ExitStack, out: Path, model: str, threads: int, log: Callable[[str], None]
) -> tuple[Any, str]:
    """One private redis-server and one generator replica for all the cells that follow."""
    from actgen_shared.client import GeneratorClient
    from actgen_shared.launcher import GeneratorProcess
    from actgen_shared.redis_embedded import EmbeddedRedis

    redis_server = stack.enter_context(EmbeddedRedis())
    log(
        f"[ablation] redis at {redis_server.url}; starting a generator with {model} "
        f"(log: {out / 'generator.log'}) ..."
    )
    generator = stack.enter_context(
        GeneratorProcess(
            redis_url=redis_server.url,
            model=model,
            log_path=out / "generator.log",
            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        )
    )
    client = stack.enter_context(GeneratorClient(generator.url, timeout_s=120))
    return client, generator.url


def current_cells(
    results: dict[str, Any],
    config: Path,
    overrides: Sequence[str],
    model: str,
    threads: int,
    out: Path,
    table: Mapping[str, list[str]] = ARMS,
) -> list[dict[str, Any]]:
    """The cells of results.json that match the present config of their arm (known arms only)."""
    kept, prints = [], {}
    for cell in results["cells"]:
        if cell["arm"] not in table:
            continue
        key = (cell["arm"], cell["seed"])
        if key not in prints:
            cfg = cell_config(config, overrides, *key, out, table)
            prints[key] = fingerprint(cfg, model, threads, oracle_policy(table[cell["arm"]]))
        if cell["fingerprint"] == prints[key]:
            kept.append(cell)
    order = {arm: i for i, arm in enumerate(table)}
    return sorted(kept, key=lambda c: (order[c["arm"]], c["seed"]))
