"""Class names for the prompts of a dataset of class folders (``a photo of {name}``, the default prompt).

A folder's name is its class name, underscores read as spaces (``golden_retriever``); an
ImageNet synset id (``n02099601``, the folders of ImageNet's train/ and val/) is named from the
bundled ImageNet-1k table; ``data.class_names`` (a list, or a file with one name per line, in
the sorted order of the folders) overrides both.

A folder name that is only an id (``class_3``, ``007``, an unknown synset) makes a prompt that
describes nothing. Decided: when the names go into prompts (generation on, no
``generation.label_set``), that is an error naming ``data.class_names``; a run that generates
nothing (mode ``real``) or prompts from a label set only gets a warning, since its names label
nothing but the report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from actgen_shared.labels import imagenet_wnids

log = logging.getLogger("actgen_trainer")

WNID = re.compile(r"n\d{8}")
# an id and nothing that describes: "3", "007", "class_3", "cls-12", "label 4", "c07"
BARE_ID = re.compile(r"(?:class|cls|label|category|c)?[\s_-]*\d+", re.IGNORECASE)
MAX_SHOWN = 5


class ClassNamesError(ValueError):
    """Class names that cannot be used for prompts; the message names ``data.class_names``."""


def folder_class_name(folder: str) -> str:
    """One class folder's name as prompt text: a known synset id's name, else the folder name."""
    known = imagenet_wnids().get(folder) if WNID.fullmatch(folder) else None
    return known if known is not None else folder.replace("_", " ").strip()


def looks_like_an_id(name: str) -> bool:
    """Whether a class name is only an id: a bare number, ``class_3``-like, or a synset id."""
    return bool(BARE_ID.fullmatch(name.strip()) or WNID.fullmatch(name.strip()))


def read_class_names(spec: Sequence[str] | str) -> list[str]:
    """``data.class_names``: the list itself, or the lines of the file it names (blank lines skipped)."""
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise ClassNamesError(f"data.class_names: {path} is not a file (one class name per line)")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = f"{path} holds"
    else:
        names = [str(name).strip() for name in spec]
        where = "the list holds"
    if not names or not all(names):
        raise ClassNamesError(f"data.class_names: {where} an empty name or no names at all")
    return names


def class_names(folders: Sequence[str], configured: Sequence[str] | str | None, prompts: bool) -> list[str]:
    """The prompt name of each class folder (in ``folders``' order, the class ids' order).

    ``prompts``: the names go into the generator's prompts, so bare ids are an error.
    """
    if configured is not None:
        names = read_class_names(configured)
        if len(names) != len(folders):
            raise ClassNamesError(
                f"data.class_names has {len(names)} names for {len(folders)} class folders "
                f"({', '.join(folders[:MAX_SHOWN])}{' ...' if len(folders) > MAX_SHOWN else ''}): "
                "one name per folder, in the sorted order of the folders"
            )
    else:
        names = [folder_class_name(folder) for folder in folders]
    bare = [name for name in names if looks_like_an_id(name)]
    if bare:
        shown = ", ".join(repr(n) for n in bare[:MAX_SHOWN]) + (" ..." if len(bare) > MAX_SHOWN else "")
        message = (
            f"{len(bare)} class names are ids, not words ({shown}): a prompt made from one "
            "describes nothing; set data.class_names (a list, or a file with one name per line, "
            "in the sorted order of the class folders)"
        )
        if prompts:
            raise ClassNamesError(message)
        log.warning("%s (no prompt uses them in this run)", message)
    return names
