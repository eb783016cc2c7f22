"""``actgen-generator``: the generator's command line (one subcommand per task).

A subcommand's module is imported only when that subcommand is named (actgen_shared.commands), so
``actgen-generator --help`` answers without importing torch or diffusers. A bad ``ACTGEN_*``
variable is one line naming it and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from actgen_shared.commands import Subcommand, build_parser

PROG = "actgen-generator"
DESCRIPTION = "ActGen generator: guided Stable Diffusion as a service."
SUBCOMMANDS = (
    Subcommand("serve", "run a generator replica (REST API + worker)", "actgen_generator.serve:add_parser"),
    Subcommand(
        "fetch-model",
        "download a model once (fp16 weights preferred), load it to prove it, print ACTGEN_MODEL",
        "actgen_generator.model_fetch:add_parser",
    ),
    Subcommand(
        "build-tiny-model",
        "write the tiny SD-architecture pipeline to DIR",
        "actgen_generator.tiny_model:add_parser",
    ),
    Subcommand(
        "train-tiny-model",
        "train the tiny SD-architecture model on the bundled digits (a diffusers folder)",
        "actgen_generator.devtools.tiny_training:add_parser",
    ),
    Subcommand(
        "eval-model",
        "check a tiny digits model: class-conditional accuracy, guide faithfulness, diversity",
        "actgen_generator.devtools.model_eval:add_parser",
    ),
    Subcommand(
        "distil-tiny-decoder",
        "distil eq. 10's tiny surrogate decoder from a tiny model's VAE into DIR/tiny_vae",
        "actgen_generator.devtools.tiny_decoder:add_parser",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(PROG, DESCRIPTION, SUBCOMMANDS, argv).parse_args(argv)
    from actgen_shared.settings import SettingsError  # pydantic: only once a subcommand runs

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
