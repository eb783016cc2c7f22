"""``actgen-lab``: the lab's command line (one subcommand per tool; each imports its modules only
when named, actgen_shared.commands).

Usage::

    actgen-lab ablate [--testbed digits|backgrounds] [--arms a,b,...] [--seeds N] [--out DIR] [--config FILE] [--set key=value ...]
    actgen-lab pairs OUT A-B [C-D ...]
    actgen-lab groups OUT A-B [C-D ...]
    actgen-lab train-tiny-model --data digits|backgrounds --out DIR [...]
    actgen-lab eval-model DIR [...]
    actgen-lab judges DIR
    actgen-lab distil-tiny-decoder --model DIR [...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from actgen_shared.commands import Subcommand, build_parser

PROG = "actgen-lab"
DESCRIPTION = "ActGen's lab: testbeds, the ablation harness, the oracle generator, the tiny models."
SUBCOMMANDS = (
    Subcommand(
        "ablate",
        "the ablation: every arm x seed on a testbed (the low-data digits, or digits on backgrounds)",
        "actgen_lab.cli:add_ablate_parser",
    ),
    Subcommand(
        "pairs",
        "paired differences between arms of an ablation's results.json (95 %% t-intervals)",
        "actgen_lab.pairs:add_parser",
    ),
    Subcommand(
        "groups",
        "a backgrounds ablation's paired differences by group and under other test mixes",
        "actgen_lab.group_mix:add_parser",
    ),
    Subcommand(
        "train-tiny-model",
        "train the tiny SD-architecture model on the bundled digits or digits on backgrounds",
        "actgen_lab.tiny_training:add_parser",
    ),
    Subcommand(
        "eval-model",
        "check a tiny digits or backgrounds model: class-conditional accuracy, faithfulness, diversity",
        "actgen_lab.model_eval:add_parser",
    ),
    Subcommand(
        "judges",
        "train a backgrounds model's digit and kind CNNs again so they read its VAE's images",
        "actgen_lab.model_eval:add_judges_parser",
    ),
    Subcommand(
        "distil-tiny-decoder",
        "distil eq. 10's tiny surrogate decoder from a tiny model's VAE into DIR/tiny_vae",
        "actgen_lab.tiny_decoder:add_parser",
    ),
)


def add_ablate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from actgen_lab import ablation

    ablate = sub.add_parser(
        "ablate",
        help="the ablation: every arm x seed on a testbed (the low-data digits, or digits on backgrounds)",
        description="Runs every arm x seed cell not yet in OUT/results.json through the trainer, with one "
        "private redis-server and one generator (none for the oracle arms), and writes OUT/results.json, OUT/table.md "
        "and OUT/index.html. "
        + " ".join(f"Arms of {t.name}: {', '.join(t.arms)}." for t in ablation.TESTBEDS.values()),
    )
    ablate.add_argument(
        "--testbed",
        default="digits",
        help=f"{' or '.join(ablation.TESTBEDS)}: its config, model, output folder, seeds and arms "
        "are the defaults below (default digits)",
    )

    def per_bed(attr: str) -> str:
        return ", ".join(f"{t.name}: {getattr(t, attr)}" for t in ablation.TESTBEDS.values())

    ablate.add_argument("--config", default=None, help=f"base trainer config (default {per_bed('config')})")
    ablate.add_argument(
        "--arms",
        help="comma-separated arm names, or all (default digits: all; backgrounds: each diffusion "
        "arm beside its oracle: real, random, ig, aig, actgen and oracle-random ... oracle-actgen)",
    )
    ablate.add_argument(
        "--seeds", type=int, default=None, help=f"seeds 0..N-1 per arm (default {per_bed('seeds')})"
    )
    ablate.add_argument("--out", default=None, help=f"output folder (default {per_bed('out')})")
    ablate.add_argument("--model", default=None, help=f"generator model folder (default {per_bed('model')})")
    ablate.add_argument(
        "--threads",
        type=int,
        default=ablation.DEFAULT_THREADS,
        help="torch threads of the trainer and of the generator (they take turns: sync)",
    )
    ablate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config value for every arm",
    )
    ablate.add_argument("--no-progress", action="store_true", help="no progress bar")
    ablate.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    from actgen_lab import ablation
    from actgen_trainer.config import ConfigError

    bed = ablation.testbed_named(args.testbed)
    # names the unknown arm before anything starts
    arms = ablation.parse_arms(args.arms, bed.arms, bed.default_arms)
    ablation.check_seeds(bed.seeds if args.seeds is None else args.seeds)
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    for name in ("actgen_trainer", "httpx"):  # per-epoch and per-request lines: the bar says enough
        logging.getLogger(name).setLevel(logging.WARNING)
    done = ablation.run_ablation(
        config=args.config,
        arms=arms,
        seeds=args.seeds,
        out=args.out,
        overrides=args.overrides,
        model=args.model,
        threads=args.threads,
        progress=not args.no_progress,
        testbed=bed.name,
    )
    print(
        f"[ablation] {len(done.ran)} cells run, {len(done.skipped)} skipped (already done) | "
        f"{done.out / ablation.TABLE_NAME} | {done.out / ablation.PAGE_NAME} | wall {done.seconds:.0f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(PROG, DESCRIPTION, SUBCOMMANDS, argv).parse_args(argv)
    from actgen_shared.settings import Settings, SettingsError

    if args.command == "ablate":
        try:  # ablate starts a generator that reads the deployment's ACTGEN_* variables
            Settings.from_env()
        except SettingsError as exc:  # before torch is imported: one line, at once
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    from actgen_trainer.config import ConfigError
    from actgen_trainer.data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError, SettingsError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
