"""``actgen-trainer``: train a classifier with ActGen, or rebuild a run's report.

Usage::

    actgen-trainer train --config FILE [--set key=value ...] [--resume] [--sync] [--generator-url URL]
    actgen-trainer report RUN_DIR

The ablation and its testbeds are the lab's (``actgen-lab ablate``, lab/).

A subcommand's modules (torch and the rest) are imported only when that subcommand is named
(actgen_shared.commands), so ``actgen-trainer --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from actgen_shared.commands import Subcommand, build_parser

PROG = "actgen-trainer"
DESCRIPTION = "Train a classifier with ActGen, or rebuild a run's report."
GENERATOR_URL_ENV = "ACTGEN_GENERATOR_URL"
SUBCOMMANDS = (
    Subcommand("train", "train a classifier (Algorithm 1)", "actgen_trainer.cli:add_train_parser"),
    Subcommand("report", "(re)build RUN_DIR/report.html", "actgen_trainer.cli:add_report_parser"),
)


def add_train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser(
        "train",
        help="train a classifier (Algorithm 1)",
        description="Train a classifier with ActGen (the paper's Algorithm 1): each epoch's hard samples go "
        "to the generator, and the images it makes are folded into the training set.",
    )
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted keys: --set train.epochs=10",
    )
    train.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    train.add_argument("--sync", action="store_true", help="wait for every job (the paper's code)")
    train.add_argument(
        "--generator-url",
        default=os.environ.get(GENERATOR_URL_ENV) or None,
        help=f"generator API base URL (else ${GENERATOR_URL_ENV}, else generation.generator_url)",
    )
    train.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        help="stop cleanly after this epoch (0-based); --resume continues",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)


def add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser("report", help="(re)build RUN_DIR/report.html")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)


def _train(args: argparse.Namespace) -> int:
    from actgen_trainer.config import TrainMode, load_config

    overrides = list(args.overrides)
    if args.sync:
        overrides.append("generation.sync=true")
    if args.generator_url:
        overrides.append(f"generation.generator_url={args.generator_url}")
    cfg = load_config(args.config, overrides)

    from actgen_trainer.loop import Trainer

    client = None
    if cfg.generation.mode is not TrainMode.real:
        from actgen_shared.client import GeneratorClient

        client = GeneratorClient(
            cfg.generation.generator_url,
            api_key=cfg.generation.api_key or os.environ.get("ACTGEN_API_KEY"),
            timeout_s=cfg.generation.request_timeout_s,
        )
    try:
        trainer = Trainer(
            cfg,
            client=client,
            resume=args.resume,
            progress=not args.no_progress,
            stop_after_epoch=args.stop_after_epoch,
        )
        summary = trainer.run()
    finally:
        if client is not None:
            client.close()
    if summary.report is not None:  # rank 0 only under torchrun
        print(f"report: {summary.report}")
        print(summary.line())
    return 0


def _report(args: argparse.Namespace) -> int:
    from actgen_trainer.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(PROG, DESCRIPTION, SUBCOMMANDS, argv).parse_args(argv)
    from actgen_shared.settings import Settings, SettingsError

    if args.command == "train":
        try:  # the deployment's ACTGEN_* variables
            Settings.from_env()
        except SettingsError as exc:  # before torch is imported: one line, at once
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    from actgen_trainer.checkpoint import CheckpointError
    from actgen_trainer.config import ConfigError
    from actgen_trainer.data import DataError
    from actgen_trainer.link import GeneratorUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        GeneratorUnavailable,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from actgen_shared.client import GeneratorError

        if isinstance(exc, GeneratorError):
            print(f"{PROG}: generator error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
