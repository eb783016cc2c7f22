"""Where the model comes from (docs/architecture.md section 9): names resolved before anything loads,
the pinned community mirror, a single checkpoint file loaded offline with the shipped SD 2.1 configs,
and ``fetch-model`` against a Hugging Face cache with the network off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ldm_checkpoint import ldm_checkpoint
from safetensors.torch import save_file

from actgen_generator.model_fetch import MARKER
from actgen_generator.model_source import (
    SD21_BASE,
    SD21_REVISION,
    ModelSourceError,
    SourceKind,
    resolve_model_source,
)
from actgen_generator.pipeline import load_pipeline, sd21_architecture_pipeline
from actgen_generator.single_file import SD21_CONFIG_DIR, load_single_file, sd21_tokenizer
from actgen_generator.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
REPO = "actgen-test/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_model_names_resolve_to_their_source(tiny_folder: Path, tmp_path: Path) -> None:
    assert resolve_model_source(None).kind is SourceKind.tiny
    mirror = resolve_model_source(SD21_BASE)
    assert (mirror.kind, mirror.location, mirror.revision) == (SourceKind.hub, SD21_BASE, SD21_REVISION)
    assert resolve_model_source(SD21_BASE, "main").revision == "main"
    assert resolve_model_source("someone/other-model").revision is None  # its default branch
    assert resolve_model_source(str(tiny_folder)).kind is SourceKind.folder
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert resolve_model_source(str(single)).kind is SourceKind.file
    for missing in ("/no/such/dir", "./nope", "../nope", "~/no-such-model", "weights.safetensors", "a/b/c"):
        with pytest.raises(ModelSourceError, match=f"model path {missing} does not exist"):
            resolve_model_source(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="hub id of the form org/name"):
        resolve_model_source("not a model")


def test_the_pinned_revision_is_what_the_deployments_fetch() -> None:
    """compose and the k8s gpu overlay fetch the mirror at the code's pinned commit, never a branch."""
    compose = (ROOT / "docker-compose.yml").read_text()
    job = (ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "model-init.yaml").read_text()
    assert SD21_BASE in compose and SD21_BASE in job
    assert SD21_REVISION in job  # the Job names it; compose passes ACTGEN_MODEL_REVISION, else the code's
    assert "stabilityai/" not in compose + job


def test_a_single_checkpoint_file_loads_back_every_weight_offline(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model written as one SD 2.x-layout file (LDM UNet and VAE, OpenCLIP text encoder) loads
    through load_single_file with every tensor in its place, nothing downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = load_pipeline(str(tiny_folder), device="cpu").pipe
    path = tmp_path / "tiny.safetensors"
    save_file(ldm_checkpoint(reference), str(path))
    loaded = load_single_file(path, torch.float32, config_dir=tiny_folder)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(reference, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_the_shipped_sd21_configs_describe_sd21_base() -> None:
    """The configs a single SD 2.1 file loads with build the architecture of section 9 (compared on the
    meta device: no weights), and the tokenizer built from the shipped merges is CLIP's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from actgen_generator.diffusers_classes import AutoencoderKL, UNet2DConditionModel

    reference = sd21_architecture_pipeline("meta", torch.float32).pipe
    with torch.device("meta"):
        built = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(SD21_CONFIG_DIR / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_CONFIG_DIR / "vae")),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig.from_json_file(str(SD21_CONFIG_DIR / "text_encoder" / "config.json"))
            ),
        }
    for part, module in built.items():
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in getattr(reference, part).state_dict().items()}, part
    tokenizer = sd21_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.pad_token_id == 0  # SD 2.x pads with "!"
    # CLIP's own example: "a photo of a cat" -> <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    index = json.loads((SD21_CONFIG_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]


def _hub_cache(home: Path, folder: Path) -> Path:
    """``folder`` laid out as huggingface_hub caches REPO at COMMIT (refs/main -> COMMIT), its UNet
    as fp16 weights only (the variant fetch-model prefers), the rest plain."""
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    unet = snapshot / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    save_file(
        {k: v.half() for k, v in load_file(str(weights)).items()},
        str(unet / "diffusion_pytorch_model.fp16.safetensors"),
    )
    weights.unlink()
    return snapshot


def test_fetch_model_resolves_loads_and_prints_the_path_offline(tiny_folder: Path, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and a cache holding the repository: fetch-model resolves it, loads it, prints
    ACTGEN_MODEL; --to copies it into a folder with the marker, and a second run keeps it; a replica's
    loader finds the hub id in the cache; a repository not cached is one error line."""
    home = tmp_path / "hf"
    snapshot = _hub_cache(home, tiny_folder)
    target = tmp_path / "volume" / "model"
    script = f"""
import sys
from actgen_generator.cli import main
from actgen_generator.pipeline import load_pipeline
codes = [main(["fetch-model", "--model", "{REPO}"]), main(["fetch-model", "--model", "{REPO}", "--to", "{target}"]),
         main(["fetch-model", "--model", "{REPO}", "--to", "{target}"])]
loaded = load_pipeline("{REPO}", device="cpu")
print("LOADED", loaded.model_id, loaded.pipe.unet.dtype, flush=True)
codes.append(main(["fetch-model", "--model", "actgen-test/not-cached"]))
print("CODES", codes)
"""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("ACTGEN_MODEL_REVISION", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    values = [line.removeprefix("ACTGEN_MODEL=") for line in lines if line.startswith("ACTGEN_MODEL=")]
    assert values == [str(snapshot), str(target), str(target)]
    assert "already complete, kept" in done.stdout and "loaded once on the CPU: OK" in done.stdout
    assert json.loads((target / MARKER).read_text()) == {"model": REPO, "revision": "main"}
    assert (target / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (target / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert f"LOADED {REPO} torch.float32" in done.stdout  # fp16 weights, upcast for the CPU
    assert "CODES [0, 0, 0, 1]" in done.stdout
    errors = [line for line in done.stderr.splitlines() if "fetch-model: error" in line]
    assert len(errors) == 1 and "actgen-test/not-cached" in errors[0] and "Traceback" not in done.stderr
