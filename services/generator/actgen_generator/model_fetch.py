"""Fetch a diffusers pipeline from the Hub once: only the files a pipeline needs, fp16 weights preferred.

``actgen-generator fetch-model [--model ID] [--revision REV] [--to DIR]`` downloads (with a progress
bar), loads the result once on the CPU to prove it, and prints the ``ACTGEN_MODEL=...`` value that
points a replica at it. Without ``--to`` the files go to the Hugging Face cache (``HF_HOME``), and a
replica given the same hub id later finds them there, offline too (``HF_HUB_OFFLINE=1``). With
``--to DIR`` they go to DIR (the model volume of docker-compose.yml and deploy/k8s), and a marker
file written last says the folder is complete. ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and
``HF_ENDPOINT`` are read by huggingface_hub itself; nothing here sets or overrides them.

A model in SD 1/2's latent space (a VAE of 4 latent channels scaled by 0.18215, SD 2.1 among them)
gets eq. 10's surrogate decoder with it: TAESD (:data:`TAESD`, an ``AutoencoderTiny``) at the pinned
commit :data:`TAESD_REVISION` (``ACTGEN_TAESD_REVISION`` names another), into the cache or
``DIR/tiny_vae`` (``pipeline.TINY_VAE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from actgen_generator.model_source import (
    SD21_BASE,
    ModelSource,
    ModelSourceError,
    SourceKind,
    resolve_model_source,
)

# What a diffusers pipeline reads besides weights: model_index.json and each component's JSON/text
# files (configs, tokenizer vocabulary and merges). Never README, .gitattributes, single-file
# checkpoints at the top level, .bin/.ckpt pickles, ONNX or Flax weights.
CONFIG_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt"]
FP16_PATTERNS = ["*/*.fp16.safetensors", "*/*.fp16-*.safetensors"]  # whole and sharded
OTHER_VARIANTS = ["*/*.*.safetensors"]  # fp16, ema, non_ema ...: not the plain weights
MARKER = ".actgen-model.json"  # written last into a --to folder: the fetch completed and loaded
# eq. 10's surrogate decoder for SD 1/2's latent space (docs/architecture.md 5): TAESD decodes the
# scaled latents as they are (its scaling_factor is 1.0; the SD VAE's is 0.18215)
TAESD = "madebyollin/taesd"
# The commit of TAESD fetched unless ACTGEN_TAESD_REVISION names another. Not resolved against the Hub
# here (no network where it was pinned): it is the commit that public projects pinning madebyollin/taesd
# name, as a revision with these very files (config.json, diffusion_pytorch_model.safetensors) and as
# their Hugging Face cache's snapshot folder (docs/operations.md, "fetch-model"). A revision that does
# not exist fails the fetch loudly; fetch-model records the commit it got in DIR/tiny_vae/TINY_VAE_MARKER.
TAESD_REVISION = "614f76814bbe30edbe2e627ace1c2234c81a2c0e"
TAESD_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
TINY_VAE_MARKER = ".actgen-tiny-vae.json"
SD_LATENT_SCALE = 0.18215
SD_VAE_CHANNELS = [128, 256, 512, 512]


def _weightless_components(folder: Path) -> list[str]:
    """Model components of ``folder`` (those with a config.json) that hold no safetensors weights yet."""
    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        part = folder / name
        if (part / "config.json").is_file() and not any(part.glob("*.safetensors")):
            missing.append(name)
    return missing


def download_pipeline(repo_id: str, revision: str | None, local_dir: Path | None = None) -> Path:
    """The folder holding ``repo_id`` at ``revision``: fetched unless the cache (or ``local_dir``) has it.

    The fp16 weights of each component when the repository has them, else its plain safetensors.
    Offline (``HF_HUB_OFFLINE=1``) it resolves from the cache alone; a ``local_dir`` not filled yet
    is then copied from the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fetch(allow: list[str], ignore: list[str] | None = None) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                local_dir=local_dir,
                allow_patterns=allow,
                ignore_patterns=ignore,
            )
        )

    try:
        folder = fetch(CONFIG_PATTERNS + FP16_PATTERNS)
    except LocalEntryNotFoundError:
        if local_dir is None:
            raise
        return _copy_from_cache(download_pipeline(repo_id, revision), local_dir)
    if missing := _weightless_components(folder):
        folder = fetch([f"{name}/*.safetensors" for name in missing], OTHER_VARIANTS)
    if missing := _weightless_components(folder):
        raise ModelSourceError(
            f"{repo_id} at revision {revision or 'main'} has no safetensors weights for {', '.join(missing)} "
            "(only safetensors are loaded; with HF_HUB_OFFLINE=1 the cache may hold only part of it)"
        )
    return folder


def in_sd_latent_space(folder: Path) -> bool:
    """Whether ``folder``'s VAE is SD 1/2's (its architecture, 4 latent channels scaled by 0.18215):
    the latent space TAESD decodes."""
    try:
        config = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    scale = config.get("scaling_factor")
    return (
        config.get("latent_channels") == 4
        and isinstance(scale, float)
        and abs(scale - SD_LATENT_SCALE) < 1e-6
        and list(config.get("block_out_channels", [])) == SD_VAE_CHANNELS
    )


def taesd_revision() -> str:
    """The TAESD revision to fetch: ``ACTGEN_TAESD_REVISION`` when set, else :data:`TAESD_REVISION`."""
    from actgen_shared.settings import Settings

    return Settings.from_env().taesd_revision or TAESD_REVISION


def download_tiny_vae(local_dir: Path | None = None, required: bool = False) -> Path | None:
    """TAESD's folder (from the cache, fetched when missing), or None when it cannot be had.

    ``required``: a failure raises instead of returning None (fetch-model); a replica without it
    serves every request but ``adv_decoder: tiny``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    revision = taesd_revision()
    try:  # into the cache first: offline, a --to folder is then filled from it all the same
        path = Path(snapshot_download(TAESD, revision=revision, allow_patterns=TAESD_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
        if required:
            raise
        return None
    if local_dir is None:
        return path
    _copy_from_cache(path, local_dir)
    # the snapshot folder is named by the commit the revision resolved to: recorded beside the weights
    marker = {"model": TAESD, "revision": revision, "commit": path.name}
    (local_dir / TINY_VAE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return local_dir


def cached_tiny_vae() -> Path | None:
    """TAESD's folder when the Hugging Face cache holds it; never downloads (single-file models)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                TAESD, revision=taesd_revision(), allow_patterns=TAESD_PATTERNS, local_files_only=True
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
        return None


def _copy_from_cache(snapshot: Path, target: Path) -> Path:
    """Copy a cached snapshot (symlinks into the blob store) to ``target`` as plain files."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(snapshot, target, symlinks=False, dirs_exist_ok=True)
    return target


def _prepare_target(target: Path, marker: dict[str, str]) -> bool:
    """True when ``target`` already holds this model complete (its marker matches).

    A folder another fetch-model filled with another model or revision is emptied first; a
    non-empty folder fetch-model did not write is refused rather than mixed into.
    """
    if not target.exists():
        return False
    if not target.is_dir():
        raise ModelSourceError(f"--to {target} exists and is not a folder")
    try:
        found = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        found = None
    if found == marker:
        return True
    if found is None and any(target.iterdir()) and not (target / ".cache" / "huggingface").is_dir():
        raise ModelSourceError(f"--to {target} is not empty and was not written by fetch-model")
    if found is not None:
        for child in target.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return False


def prove(source: ModelSource, folder: Path, tiny_vae: Path | None = None) -> None:
    """Load every component once, in float16 on the CPU (half the memory; nothing runs)."""
    import torch

    from actgen_generator.pipeline import load_tiny_vae  # diffusers: only when loading

    if source.kind is SourceKind.file:
        from actgen_generator.single_file import load_single_file

        load_single_file(folder, torch.float16)
    else:
        from actgen_generator.pipeline import pipeline_from_folder

        pipeline_from_folder(folder, torch.float16)
    if tiny_vae is not None and load_tiny_vae(tiny_vae, torch.float16) is None:
        raise ModelSourceError(f"{tiny_vae} holds no tiny decoder (config.json)")


def fetch_model(model: str, revision: str | None, target: Path | None) -> tuple[Path, bool]:
    """Fetch ``model`` (to ``target`` when given), load it once on the CPU; (its folder, whether it was
    already complete there). A local folder or checkpoint file is only loaded."""
    source = resolve_model_source(model, revision)
    if source.kind is SourceKind.tiny:
        raise ModelSourceError("--model must name a hub id, a folder or a checkpoint file")
    if source.kind is not SourceKind.hub:
        prove(source, Path(source.location))
        return Path(source.location), False
    marker = {"model": source.location, "revision": source.revision or "main"}
    if target is not None and _prepare_target(target, marker):
        return target, True
    folder = download_pipeline(source.location, source.revision, target)
    tiny_vae = None
    if in_sd_latent_space(folder):  # eq. 10's surrogate decoder, beside the model (pipeline.TINY_VAE_DIR)
        tiny_target = None if target is None else target / "tiny_vae"
        tiny_vae = download_tiny_vae(tiny_target, required=True)
    prove(source, folder, tiny_vae)
    if target is not None:
        (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return folder, False


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``actgen-generator fetch-model [--model ID] [--revision REV] [--to DIR]``."""
    parser = subparsers.add_parser(
        "fetch-model",
        help="download a model once (fp16 weights preferred), load it to prove it, print ACTGEN_MODEL",
        description="Download a diffusers pipeline from the Hugging Face Hub (only the files a pipeline "
        "needs; the fp16 weights when the repository has them) into the Hugging Face cache or DIR, "
        "load it once on the CPU, and print the ACTGEN_MODEL value that points a replica at it. "
        "HF_TOKEN, HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT are honoured.",
    )
    parser.add_argument(
        "--model",
        default=SD21_BASE,
        metavar="ID",
        help=f"hub id (or a local folder or file to check) (default {SD21_BASE})",
    )
    parser.add_argument(
        "--revision",
        default=None,
        metavar="REV",
        help="branch, tag or commit (default: ACTGEN_MODEL_REVISION, else the pinned commit for "
        f"{SD21_BASE}, else main)",
    )
    parser.add_argument(
        "--to", default=None, metavar="DIR", help="folder to fill (default: the Hugging Face cache)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from actgen_shared.settings import Settings

    revision = args.revision or Settings.from_env().model_revision
    target = Path(args.to).expanduser().resolve() if args.to else None
    try:
        folder, kept = fetch_model(args.model, revision, target)
    except (ModelSourceError, HfHubHTTPError, LocalEntryNotFoundError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"actgen-generator fetch-model: error: {args.model}: {message}", file=sys.stderr)
        return 1
    state = "already complete, kept" if kept else "loaded once on the CPU: OK"
    print(f"{args.model} in {folder} ({state})")
    print(f"ACTGEN_MODEL={folder}")
    return 0


__all__ = [
    "MARKER",
    "TAESD",
    "TAESD_REVISION",
    "add_parser",
    "cached_tiny_vae",
    "download_pipeline",
    "download_tiny_vae",
    "fetch_model",
    "in_sd_latent_space",
    "run",
    "taesd_revision",
]
