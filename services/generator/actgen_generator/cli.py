"""``actgen-generator``: the generator's command line (one subcommand per task)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from actgen_generator import serve, tiny_model
from actgen_generator.devtools import model_eval, tiny_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actgen-generator", description="ActGen generator: guided Stable Diffusion as a service"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(subparsers)
    tiny_model.add_parser(subparsers)
    tiny_training.add_parser(subparsers)
    model_eval.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
