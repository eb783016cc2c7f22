"""``actgen-trainer ablate`` (``make ablation``): what each part of ActGen buys, on a testbed.

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
import html
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from actgen_shared.digits import ReferenceClassifier as DigitsReference
from actgen_shared.digits import load_digits_split
from actgen_shared.presets import read_model_defaults, resolve_options
from actgen_shared.schemas import GenerationOptions
from actgen_trainer.config import Config, ConfigError, TrainMode, load_config
from actgen_trainer.demo import _in_repo
from actgen_trainer.loop import Trainer
from actgen_trainer.models import predict
from actgen_trainer.report import STYLE, _data_uri

# The arms: name -> ``--set`` overrides of the base config. Adding an arm is one line. The base
# config names no preset, so every arm runs on the digits model's own defaults (its folder's
# actgen_defaults.json: nu 0.01, token norm on [uncond, c], CFG 15, margin 200, [0, 1] mask) but
# for what the arm sets; ``actgen-released`` names the released preset (and so its schedule).
ARMS: dict[str, list[str]] = {
    "real": ["generation.mode=real"],
    "focal": ["generation.mode=real", "optim.loss=focal"],
    "random": ["generation.mode=random"],
    "ig": ["generation.mode=ig"],
    "aig": ["generation.mode=aig"],
    "aig+contrastive": ["generation.mode=actgen", "generation.guidance=contrastive"],
    "aig+adversarial": ["generation.mode=actgen", "generation.guidance=adversarial"],
    "actgen": ["generation.mode=actgen", "generation.guidance=both"],
    # the released code's eq. 11 exactly (the token norm on [uncond, c], nu 0.05): too far on this model
    "actgen-nu0.05": ["generation.mode=actgen", "generation.guidance=both", "generation.options.lr=0.05"],
    # eq. 11 as the paper's text reads it (the global norm, c alone, nu 0.05): with the digits'
    # CFG 15, margin 200 and [0, 1] mask, the values of the paper preset
    "actgen-global": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.options.lr=0.05",
        "generation.options.grad_norm=global",
        "generation.options.update_uncond=false",
    ],
    # the released train.py's schedule: adv_prob 0.5 by mid-training, plain-SD items early on
    "actgen-authors": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.adv_schedule=authors",
    ],
    # everything as the released code has it: the released preset (CFG 7.5, margin 100, nu 0.05,
    # token norm on [uncond, c], the mask summed from ones) and the authors' schedule
    "actgen-released": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.preset=released",
        "generation.adv_schedule=null",
    ],
    # our own: actgen, but the budget goes to the lowest-confidence slice images, all distinct
    "actgen+lowconf": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.selection=lowest_confidence",
    ],
}

# The backgrounds testbed's arms. Options no arm sets come from models/tiny-backgrounds'
# actgen_defaults.json (the settings the testbed's predictions were written for: CFG 15, margin 200,
# nu 0.01 with the token norm on [uncond, c], the [0, 1] mask); `released` and `paper` name a preset
# instead, which replaces that file. gamma's midpoint 12.5 is scaled to the 20 steps (6.25) by
# options.image_guidance_reference_steps.
_ACTGEN = ["generation.mode=actgen", "generation.guidance=both"]
ARMS_BACKGROUNDS: dict[str, list[str]] = {
    "real": ["generation.mode=real"],
    "focal": ["generation.mode=real", "optim.loss=focal"],
    "random": ["generation.mode=random"],
    "ig": ["generation.mode=ig"],
    "aig": ["generation.mode=aig"],
    # eq. 8 with the released code's unnormalised attention sum (m >= 1 everywhere) instead
    "aig-unnormalised": ["generation.mode=aig", "generation.options.normalize_mask=false"],
    "aig+contrastive": ["generation.mode=actgen", "generation.guidance=contrastive"],
    # L_adv on half the items from the first job (the paper's schedule reaches only 0.25 by mid-run)
    "aig+adversarial": [
        "generation.mode=actgen",
        "generation.guidance=adversarial",
        "generation.adv_schedule=constant",
    ],
    "actgen": _ACTGEN,
    # the released code: its preset (CFG 7.5, margin 100, nu 0.05 with the token norm on
    # [uncond, c], the unnormalised mask) and train.py's schedule (plain-SD items early on)
    "released": [*_ACTGEN, "generation.preset=released", "generation.adv_schedule=authors"],
    # the paper's text: its preset (CFG 15, margin 200, nu 0.05 with the global norm on c alone,
    # the [0, 1] mask) and its schedule (adv_prob 0.5 * epoch / epochs)
    "paper": [*_ACTGEN, "generation.preset=paper"],
    # as in real use: the trainer does not wait for its images (they arrive an epoch or more later)
    "actgen-async": [*_ACTGEN, "generation.sync=false"],
    # our own: eq. 9's margin scaled to these latents, 200 x sqrt(4*8*8 / (4*64*64)) = 25, so the
    # hinge repels near-duplicates as 200 does on SD 2.1's, instead of pushing every image away
    "ours": [*_ACTGEN, "generation.options.contrastive_margin=25"],
}
BASELINES = ("real", "random")  # the paired differences of the table
DEFAULT_CONFIG = "configs/ablation.yaml"
DEFAULT_MODEL = "models/tiny-digits"
DEFAULT_OUT = "runs/ablation"
DEFAULT_SEEDS = 5
DEFAULT_THREADS = 1
RESULTS_NAME = "results.json"
TABLE_NAME = "table.md"
PAGE_NAME = "index.html"
EXAMPLES_PER_CELL = 6
# Cell settings that do not change what a cell computes (so they do not make its result stale).
_NOT_FINGERPRINTED = ("output_dir", "run_name")
_NOT_FINGERPRINTED_GENERATION = ("generator_url", "api_key", "request_timeout_s", "wait_timeout_s")


# ----------------------------------------------------------------------- the testbeds
@dataclass(frozen=True)
class Testbed:
    """A data set, its base config, its generator, its arms, and where its results go."""

    name: str
    title: str
    config: str
    model: str
    out: str
    seeds: int
    arms: Mapping[str, list[str]]


TESTBEDS: dict[str, Testbed] = {
    "digits": Testbed(
        "digits", "the digits (low data)", DEFAULT_CONFIG, DEFAULT_MODEL, DEFAULT_OUT, DEFAULT_SEEDS, ARMS
    ),
    "backgrounds": Testbed(
        "backgrounds",
        "digits on backgrounds (class-correlated in training, random in test)",
        "configs/ablation_backgrounds.yaml",
        "models/tiny-backgrounds",
        "runs/ablation-backgrounds",
        10,
        ARMS_BACKGROUNDS,
    ),
}


def testbed_named(name: str) -> Testbed:
    """The testbed called ``name``; an unknown one fails naming the known ones."""
    try:
        return TESTBEDS[name]
    except KeyError:
        raise ConfigError(f"unknown testbed {name!r}: the testbeds are {', '.join(TESTBEDS)}") from None


# ----------------------------------------------------------------------- the grid
def parse_arms(text: str | None, table: Mapping[str, list[str]] = ARMS) -> list[str]:
    """``a,b,c`` -> the arms in that order (all of ``table`` for None); unknown names fail."""
    if text is None:
        return list(table)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError("--arms is empty: give arm names separated by commas")
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}: the arms are {', '.join(table)}")
    return list(dict.fromkeys(names))


def check_seeds(seeds: int) -> list[int]:
    """Seeds 0 .. n-1; at least 2 are needed for a paired interval, 1 still runs."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    return list(range(seeds))


def _shown(path: Path) -> str:
    """A path as the page shows it: relative to the repository when inside it."""
    repo = Path(__file__).resolve().parents[3]
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
            *table[arm],
            f"seed={seed}",
            f"output_dir={out / 'cells'}",
            f"run_name={_slug(arm)}-seed{seed}",
        ],
    )


def fingerprint(cfg: Config, model: str, threads: int) -> str:
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
    tree["generator_model"] = Path(model).name
    tree["torch_threads"] = threads
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- statistics
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


# ----------------------------------------------------------------------- diagnostics
class ReferenceClassifier(DigitsReference):
    """The digits reference, with its own score on the real test split and the real diversity."""

    def __init__(self, image_size: int) -> None:
        split = load_digits_split(image_size)
        super().__init__(split)
        self.test_accuracy = float(np.mean(self.predict(split.test_images) == split.test_labels))
        self.real_diversity = class_diversity(split.train_images, split.train_labels)


def class_diversity(images: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean over classes (with 2+ images) of the mean pairwise RMS distance of pixels in [0, 1]."""
    from scipy.spatial.distance import pdist

    per_class = []
    for c in np.unique(labels):
        group = images[labels == c].reshape(int(np.sum(labels == c)), -1).astype(np.float64) / 255.0
        if len(group) >= 2:
            per_class.append(float(np.mean(pdist(group)) / math.sqrt(group.shape[1])))
    return float(np.mean(per_class)) if per_class else None


def diagnostics(trainer: Trainer, reference: ReferenceClassifier) -> dict[str, float | None]:
    """Hardness, diversity and faithfulness of a finished run's generated images (None if none)."""
    generated = trainer.generated
    if len(generated) == 0:
        return {"hardness": None, "diversity": None, "faithfulness": None}
    labels = np.array([r.class_id for r in generated.records], dtype=np.int64)
    images = np.stack([np.asarray(generated.image(i), dtype=np.uint8) for i in range(len(generated))])
    generated.transform = trainer.eval_tf
    loader = DataLoader(generated, batch_size=trainer.cfg.train.eval_batch_size, shuffle=False)
    probs, _ = predict(trainer.model, loader, trainer.device)
    hardness = float(np.mean(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    faithfulness = float(np.mean(reference.predict(images) == labels))
    return {"hardness": hardness, "diversity": class_diversity(images, labels), "faithfulness": faithfulness}


class Diagnostics(Protocol):
    """How a testbed measures a finished cell (the digits' below, the backgrounds' in testbed.py)."""

    trainer_class: type[Trainer]

    def setup(self) -> dict[str, Any]:
        """What results.json keeps of the references (their own scores)."""
        ...

    def measure(self, trainer: Trainer) -> dict[str, Any]:
        """The cell's figures; a ``test_acc`` among them replaces the loop's."""
        ...


class DigitsDiagnostics:
    """Hardness, diversity and faithfulness on the digits (:func:`diagnostics`)."""

    trainer_class = Trainer

    def __init__(self, image_size: int) -> None:
        self.reference = ReferenceClassifier(image_size)

    def setup(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.reference.test_accuracy,
            "real_diversity": self.reference.real_diversity,
        }

    def measure(self, trainer: Trainer) -> dict[str, Any]:
        return dict(diagnostics(trainer, self.reference))


def testbed_diagnostics(testbed: Testbed, cfg: Config, model: str) -> Diagnostics:
    """The diagnostics of ``testbed`` (the backgrounds' import the generator lazily)."""
    if testbed.name == "backgrounds":
        from actgen_trainer.testbed import BackgroundsDiagnostics

        return BackgroundsDiagnostics(model)
    return DigitsDiagnostics(cfg.data.image_size)


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
    arms = list(table) if arms is None else parse_arms(",".join(arms), table)
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
        print_ = fingerprint(cfg, model, threads)
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
        ran = _run_cells(todo, results, measure, out, model, threads, progress, log)
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
) -> list[tuple[str, int]]:
    """The cells one after another, results.json saved after each; servers only if one generates."""
    from tqdm.auto import tqdm

    ran: list[tuple[str, int]] = []
    with ExitStack() as stack:
        client, url = None, None
        bar = tqdm(todo, disable=not progress, desc="ablation", unit="cell", dynamic_ncols=True)
        for arm, seed, cfg, print_ in bar:
            bar.set_postfix_str(f"{arm} seed {seed}")
            if client is None and cfg.generation.mode is not TrainMode.real:
                client, url = _start_generator(stack, out, model, threads, bar.write if progress else log)
            if url is not None:
                cfg = cfg.model_copy(
                    update={"generation": cfg.generation.model_copy(update={"generator_url": url})}
                )
            cell = run_cell(cfg, arm, print_, client, measure, out)
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
            prints[key] = fingerprint(cell_config(config, overrides, *key, out, table), model, threads)
        if cell["fingerprint"] == prints[key]:
            kept.append(cell)
    order = {arm: i for i, arm in enumerate(table)}
    return sorted(kept, key=lambda c: (order[c["arm"]], c["seed"]))


# ----------------------------------------------------------------------- summaries
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
                    b: paired_difference(acc[arm], acc[b]) if b in acc and b != arm else None
                    for b in BASELINES
                },
                hardness=_mean_or_none(c["hardness"] for c in seeds.values()),
                diversity=_mean_or_none(c["diversity"] for c in seeds.values()),
                faithfulness=_mean_or_none(c["faithfulness"] for c in seeds.values()),
                extra=extra,
                worst_vs={
                    b: paired_difference(worst[arm], worst[b])
                    if worst[arm] and b in worst and b != arm
                    else None
                    for b in BASELINES
                },
            )
        )
    return rows


def _pp(diff: PairedDiff | None) -> str:
    """A paired difference in percentage points: ``+1.23 [-0.40, +2.86]``."""
    if diff is None:
        return "-"
    if diff.low is None or diff.high is None:
        return f"{100 * diff.mean:+.2f} (n=1)"
    return f"{100 * diff.mean:+.2f} [{100 * diff.low:+.2f}, {100 * diff.high:+.2f}]"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _pm(value: tuple[float, float] | None, scale: float = 100.0, fmt: str = ".1f") -> str:
    """``mean ± std`` of a (mean, std) pair, scaled (percent by default); ``-`` when missing."""
    if value is None:
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
            "minority-bg %",
            "majority-bg %",
            "images",
            "s / cell",
        ],
        [
            [
                r.arm,
                str(len(r.seeds)),
                f"{100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f}",
                _pp(r.vs["real"]),
                _pp(r.vs["random"]),
                _pm(r.extra.get("worst_group_accuracy")),
                _pp(r.worst_vs.get("real")),
                _pm(r.extra.get("minority_accuracy")),
                _pm(r.extra.get("majority_accuracy")),
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
    "Δ: mean over seeds of (arm - baseline), paired by seed, 95 % t-interval. Test accuracy on the "
    "whole test split (random backgrounds); worst-group: the lowest accuracy over the (class, "
    "background kind) groups; minority-bg / majority-bg: test images whose background is not / is "
    "their class's majority kind in training. hardness at ask: cross-entropy under the classifier "
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
            _pp(r.vs["real"]),
            _pp(r.vs["random"]),
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


def bar_chart_svg(rows: list[ArmSummary], width: int = 760, height: int = 330) -> str:
    """Inline SVG: mean test accuracy per arm with ± std error bars, on a zoomed y axis."""
    if not rows:
        return "<p>No finished cells yet.</p>"
    lows = [100 * (r.acc_mean - r.acc_std) for r in rows]
    highs = [100 * (r.acc_mean + r.acc_std) for r in rows]
    y0 = max(0.0, math.floor((min(lows) - 1) / 2) * 2)
    y1 = min(100.0, math.ceil((max(highs) + 0.5) / 2) * 2)
    y1 = max(y1, y0 + 2)
    left, right, top, bottom = 50, 10, 20, 95
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / len(rows)

    def y(value: float) -> float:
        return top + plot_h * (1 - (min(max(value, y0), y1) - y0) / (y1 - y0))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">'
    ]
    step = 1 if y1 - y0 <= 10 else 2 if y1 - y0 <= 20 else 5 if y1 - y0 <= 50 else 10
    tick = y0
    while tick <= y1 + 1e-9:
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            f'stroke="#e5e5e5"/><text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>'
        )
        tick += step
    parts.append(
        f'<text x="12" y="{top + plot_h / 2:.0f}" transform="rotate(-90 12 {top + plot_h / 2:.0f})" '
        f'text-anchor="middle">test accuracy % (axis from {y0:g})</text>'
    )
    for i, r in enumerate(rows):
        cx = left + slot * (i + 0.5)
        bw = slot * 0.6
        colour = "#888" if r.arm in BASELINES or r.arm == "focal" else "#3b7dd8"
        mean = 100 * r.acc_mean
        parts.append(
            f'<rect x="{cx - bw / 2:.1f}" y="{y(mean):.1f}" width="{bw:.1f}" '
            f'height="{top + plot_h - y(mean):.1f}" fill="{colour}"><title>{html.escape(r.arm)}: '
            f"{mean:.2f} ± {100 * r.acc_std:.2f} % ({len(r.seeds)} seeds)</title></rect>"
        )
        lo, hi = y(100 * (r.acc_mean - r.acc_std)), y(100 * (r.acc_mean + r.acc_std))
        parts.append(
            f'<path d="M{cx:.1f} {lo:.1f}V{hi:.1f}M{cx - 6:.1f} {lo:.1f}h12M{cx - 6:.1f} {hi:.1f}h12" '
            f'stroke="#222" fill="none"/>'
        )
        parts.append(f'<text x="{cx:.1f}" y="{hi - 4:.1f}" text-anchor="middle">{mean:.1f}</text>')
        base = top + plot_h + 12
        parts.append(
            f'<text x="{cx:.1f}" y="{base}" text-anchor="end" '
            f'transform="rotate(-35 {cx:.1f} {base})">{html.escape(r.arm)}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#222"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _thumbnails(out: Path, cells: list[dict[str, Any]]) -> str:
    """Guide -> generated pairs of an arm's first seed, inlined as data URIs."""
    if not cells or not cells[0]["examples"]:
        return "<p>No generated images.</p>"
    figures = []
    for pair in cells[0]["examples"]:
        guide, image = out / pair["guide"], out / pair["generated"]
        if guide.exists() and image.exists():
            figures.append(
                f'<figure><img src="{_data_uri(guide.read_bytes())}" alt="guide"><span>&rarr;</span>'
                f'<img src="{_data_uri(image.read_bytes())}" alt="generated">'
                f"<figcaption>{pair['class_id']} &middot; epoch {pair['epoch']}</figcaption></figure>"
            )
    return f'<p>seed {cells[0]["seed"]}</p><div class="gallery">{"".join(figures)}</div>'


def write_page(out: Path, cells: list[dict[str, Any]], results: dict[str, Any]) -> Path:
    """OUT/index.html, self-contained: the bar chart, the table, per-arm diagnostics and thumbnails."""
    rows = summarize(cells)

    def html_table(header: list[str], body: list[list[str]]) -> str:
        return (
            "<table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in body)
            + "</table>"
        )

    if _is_testbed(results):
        tables = [html_table(*t) for t in testbed_tables(rows)]
        note = f"<p>{html.escape(TESTBED_NOTE)}</p>"
    else:
        tables = [html_table(*table_rows(rows))]
        note = (
            "<p>Δ: paired by seed, 95 % t-interval, percentage points. hardness: the final classifier's "
            "mean cross-entropy on the arm's generated images; diversity: mean pairwise RMS pixel distance "
            "between generated images of one class; faithfulness: share read as their class by the "
            "reference classifier (RBF SVM on 8x8 grey levels of the real training split).</p>"
        )
    sections = [
        f"<h1>{html.escape(_title(results))}</h1>",
        f"<p>{html.escape(_setup_line(results, cells))}</p>",
        "<h2>Mean test accuracy ± std over seeds</h2>",
        bar_chart_svg(rows),
        "<h2>Per arm</h2>",
        *tables,
        note,
    ]
    arm_table = results.get("setup", {}).get("arms", ARMS)
    for r in rows:
        arm_cells = [c for c in cells if c["arm"] == r.arm]
        per_seed = ", ".join(f"{c['seed']}: {100 * c['test_acc']:.1f}" for c in arm_cells)
        sections.append(
            f"<h2>{html.escape(r.arm)}</h2><p><code>{html.escape(' '.join(arm_table.get(r.arm, [])))}</code>"
            f"<br>test accuracy by seed: {html.escape(per_seed)}<br>hardness {_num(r.hardness)}, "
            f"diversity {_num(r.diversity)}, faithfulness {_num(r.faithfulness, '.2f')}</p>"
        )
        if any(c["images_generated"] for c in arm_cells):
            sections.append(_thumbnails(out, arm_cells))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>ActGen ablation</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    path = out / PAGE_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
