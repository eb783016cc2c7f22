"""Eq. 10's surrogate decoder as it is obtained (issue 26): TAESD fetched with an SD-latent-space model by
``fetch-model`` (against a Hugging Face cache, network off), distilled for the tiny models by
``distil-tiny-decoder``, and the one models/tiny-digits ships, with its measured fidelity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actgen_generator.diffusers_classes import AutoencoderTiny
from actgen_generator.model_fetch import TAESD, TAESD_REVISION, in_sd_latent_space
from actgen_generator.pipeline import TINY_VAE_DIR, load_pipeline
from actgen_generator.single_file import SD21_CONFIG_DIR
from actgen_generator.tiny_model import build_tiny_model
from actgen_lab.tiny_decoder import (
    META_FILE,
    DistilConfig,
    distil,
    guided_latents,
    probe_classifier,
    surrogate_fidelity,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "tiny-digits"
REPO = "actgen-test/sd-latents"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_TAESD_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"  # what refs/main names in the test cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache_repo(home: Path, repo: str, commit: str, source: Path, branch: str | None = "main") -> Path:
    """``source`` laid out as huggingface_hub caches ``repo`` at ``commit`` (refs/``branch`` -> commit)."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    shutil.copytree(source, snapshot)
    if branch is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / branch).write_text(commit)
    return snapshot


def test_taesd_is_pinned_at_a_commit() -> None:
    """The TAESD revision is a commit (40 hex digits), never a branch that moves under a deployment."""
    assert len(TAESD_REVISION) == 40 and int(TAESD_REVISION, 16) >= 0


@pytest.mark.parametrize("override", [None, "main"], ids=["pinned", "ACTGEN_TAESD_REVISION"])
def test_fetch_model_brings_taesd_beside_an_sd_latent_space_model_offline(
    tmp_path: Path, override: str | None
) -> None:
    """A model whose VAE is SD's gets TAESD with it: in the cache for a replica, in DIR/tiny_vae with
    the commit it resolved for --to; the loader then has it (the tiny model stands in for SD 2.1).
    TAESD comes at its pinned commit, or at the revision ``ACTGEN_TAESD_REVISION`` names (here the
    cache's ``main``, another commit): the marker records which, and the commit it resolved to."""
    model = build_tiny_model(tmp_path / "model")
    # SD 2.1's VAE is in that space, the tiny model's (its scale, not its architecture) and tiny-digits' not
    assert in_sd_latent_space(SD21_CONFIG_DIR) and not in_sd_latent_space(model)
    assert not in_sd_latent_space(DIGITS)
    taesd = tmp_path / "taesd"
    AutoencoderTiny(**tiny_config(2, 4, DistilConfig(channels=8, blocks=1))).save_pretrained(
        str(taesd), safe_serialization=True
    )
    home = tmp_path / "hf"
    _cache_repo(home, REPO, COMMIT, model)
    _cache_repo(home, TAESD, TAESD_REVISION, taesd, branch=None)  # the pinned commit: no ref needed
    _cache_repo(home, TAESD, OTHER_TAESD_COMMIT, taesd)  # and main, at another commit
    target = tmp_path / "volume" / "model"
    script = f"""
import actgen_generator.model_fetch as model_fetch
model_fetch.in_sd_latent_space = lambda folder: True  # the tiny model stands in for SD 2.1 (5 GB)
from actgen_generator.cli import main
from actgen_generator.pipeline import load_pipeline
code = main(["fetch-model", "--model", "{REPO}", "--to", "{target}"])
loaded = load_pipeline("{REPO}", device="cpu")
folder = load_pipeline("{target}", device="cpu")
print("RESULT", code, type(loaded.tiny_vae).__name__, type(folder.tiny_vae).__name__, flush=True)
"""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("ACTGEN_MODEL_REVISION", None)
    env.pop("ACTGEN_TAESD_REVISION", None)
    if override is not None:
        env["ACTGEN_TAESD_REVISION"] = override
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT 0 AutoencoderTiny AutoencoderTiny" in done.stdout, done.stderr[-3000:]
    marker = json.loads((target / TINY_VAE_DIR / ".actgen-tiny-vae.json").read_text())
    expected = (override, OTHER_TAESD_COMMIT) if override else (TAESD_REVISION, TAESD_REVISION)
    assert marker == {"model": TAESD, "revision": expected[0], "commit": expected[1]}
    assert (target / TINY_VAE_DIR / "diffusion_pytorch_model.safetensors").is_file()


def test_a_distilled_decoder_loads_with_its_model_and_tracks_the_vae(tmp_path: Path) -> None:
    """A short distillation on a copy of tiny-digits writes tiny_vae/ the loader finds; its gradient
    is closer to the VAE's than an untrained decoder's of the same architecture."""
    folder = tmp_path / "digits"
    shutil.copytree(DIGITS, folder, ignore=shutil.ignore_patterns(TINY_VAE_DIR))
    model = load_pipeline(str(folder), device="cpu", dtype="float32")
    assert model.tiny_vae is None
    cfg = DistilConfig(steps=100, pool=256, batch=32, budget_s=240.0)
    torch.manual_seed(cfg.seed)
    untrained = AutoencoderTiny(**tiny_config(4, 4, cfg)).eval().requires_grad_(False)
    tiny, summary = distil(model, folder, cfg)
    assert summary["steps"] >= 1 and summary["final_pixel_loss"] < 1.0
    classifier = probe_classifier(folder, model.native_size, epochs=2)
    latents, labels = guided_latents(model, folder, 24, seed=3)
    figures = {}
    for name, decoder in (("untrained", untrained), ("distilled", tiny)):
        model.tiny_vae = decoder
        figures[name] = surrogate_fidelity(
            model, classifier, model.native_size, latents=latents, labels=labels
        )
    assert figures["distilled"]["grad_cosine_mean"] > figures["untrained"]["grad_cosine_mean"] + 0.1
    assert figures["distilled"]["pixel_mean_abs_diff"] < figures["untrained"]["pixel_mean_abs_diff"]


def test_the_shipped_digits_decoder_is_found_and_its_figures_hold() -> None:
    """models/tiny-digits/tiny_vae: loaded with the model; the fidelity recorded at distillation is
    re-measured on other latents within a margin (gradient cosine, top-1 agreement)."""
    model = load_pipeline(str(DIGITS), device="cpu", dtype="float32")
    assert isinstance(model.tiny_vae, AutoencoderTiny)
    assert model.tiny_vae.config["scaling_factor"] == 1.0
    recorded = json.loads((DIGITS / TINY_VAE_DIR / META_FILE).read_text())["fidelity"]
    classifier = probe_classifier(DIGITS, model.native_size, epochs=4)
    latents, labels = guided_latents(model, DIGITS, 64, seed=11)
    now = surrogate_fidelity(model, classifier, model.native_size, latents=latents, labels=labels)
    assert now["grad_cosine_mean"] > recorded["grad_cosine_mean"] - 0.1
    assert now["top1_agreement"] > recorded["top1_agreement"] - 0.1
