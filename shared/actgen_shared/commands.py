"""Command lines whose subcommands import their modules only when named (both services' CLIs).

``PROG --help`` lists every subcommand from a table of names and one-line helps, importing nothing
heavy (torch, diffusers and uvicorn take seconds), so it answers at once. The subcommand named on
the command line, and it alone, gets its options from its module: ``Subcommand.define`` is
``"package.module:function"``, a function that adds the subcommand's parser (with its options and
``func``, the function that runs it) to the subparsers it is given.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its name, the line ``--help`` shows for it, and where its parser is defined."""

    name: str
    help: str
    define: str  # "module:function" adding the full parser to an argparse subparsers object


def named_subcommand(argv: Sequence[str], subcommands: Sequence[Subcommand]) -> Subcommand | None:
    """The subcommand ``argv`` names (its first word that is not an option), if it is a known one."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return next((cmd for cmd in subcommands if cmd.name == word), None)


def build_parser(
    prog: str, description: str, subcommands: Sequence[Subcommand], argv: Sequence[str]
) -> argparse.ArgumentParser:
    """The program's parser: every subcommand listed, the one ``argv`` names defined in full."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = named_subcommand(argv, subcommands)
    for cmd in subcommands:
        if cmd is chosen:
            module, _, function = cmd.define.partition(":")
            getattr(importlib.import_module(module), function)(subparsers)
        else:
            subparsers.add_parser(cmd.name, help=cmd.help)
    return parser


__all__ = ["Subcommand", "build_parser", "named_subcommand"]
