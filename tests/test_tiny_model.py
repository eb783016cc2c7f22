"""The tiny SD-architecture model: tokenizer, determinism, diffusers round trip, generation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from actgen_generator import cli
from actgen_generator.pipeline import TINY_MODEL_ID, load_pipeline
from actgen_generator.tiny_model import build_tiny_model, build_tiny_pipeline, build_tokenizer
from actgen_shared.labels import LABEL_SETS, class_names_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_prompt_tokenises_to_whole_words(tokenizer) -> None:
    ids = tokenizer("a photo of cat").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "cat</w>", "<|endoftext|>"]
    assert tokenizer.unk_token_id not in tokenizer("a photo of the digit").input_ids[1:-1]


def test_every_bundled_class_name_is_whole_words(tokenizer) -> None:
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    norm = tokenizer.backend_tokenizer.normalizer
    for label_set in LABEL_SETS:
        for name in class_names_for(label_set):
            words = pre.pre_tokenize_str(norm.normalize_str(name))
            ids = tokenizer(name, add_special_tokens=False).input_ids
            assert len(ids) == len(words), (label_set, name, tokenizer.convert_ids_to_tokens(ids))


def test_same_seed_same_weights_different_seed_different() -> None:
    a, b, c = (build_tiny_pipeline(seed).unet.state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_round_trip_and_generate_from_prompt(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "tiny", seed=0)
    assert (folder / "model_index.json").is_file()
    original = build_tiny_pipeline(0)
    loaded = load_pipeline(str(folder), device="cpu")
    assert loaded.native_size == 32 and loaded.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(original, name).state_dict()
        got = getattr(loaded.pipe, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert loaded.pipe.tokenizer("a photo of dog").input_ids == original.tokenizer("a photo of dog").input_ids
    # save_pretrained of the loaded pipeline, loaded again, gives the same image
    loaded.pipe.save_pretrained(tmp_path / "again")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "again", safety_checker=None)
    images = [
        p(
            "a photo of cat",
            num_inference_steps=3,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        for p in (loaded.pipe, again)
    ]
    assert images[0].shape == (1, 32, 32, 3)
    assert np.isfinite(images[0]).all()
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)


def test_default_model_builds_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACTGEN_CACHE_DIR", str(tmp_path / "cache"))
    first = load_pipeline(None, device="cpu")
    assert first.model_id == TINY_MODEL_ID
    stamp = (tmp_path / "cache" / "model_index.json").stat().st_mtime_ns
    load_pipeline(None, device="cpu")
    assert (tmp_path / "cache" / "model_index.json").stat().st_mtime_ns == stamp


def test_bad_model_arguments_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(None, device="cpu", dtype="int8")


def test_cli_builds_the_model(tmp_path: Path, capsys) -> None:
    assert cli.main(["build-tiny-model", str(tmp_path / "m"), "--seed", "2"]) == 0
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "written to" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["build-tiny-model", str(tmp_path / "n"), "--seed", "-1"])


def test_a_cached_tiny_model_from_another_builder_is_rebuilt(tmp_path: Path) -> None:
    from actgen_generator.pipeline import ensure_tiny_model
    from actgen_generator.tiny_model import tiny_fingerprint

    folder = build_tiny_model(tmp_path / "tiny")
    meta = folder / "actgen_tiny.json"
    assert json.loads(meta.read_text())["fingerprint"] == tiny_fingerprint()
    untouched = (folder / "unet" / "config.json").stat().st_mtime_ns
    ensure_tiny_model(folder)  # current: kept as it is
    assert (folder / "unet" / "config.json").stat().st_mtime_ns == untouched
    meta.write_text(json.dumps({"version": "tiny-v1", "seed": 0, "fingerprint": "older-builder"}))
    ensure_tiny_model(folder)  # stale: rebuilt
    assert json.loads(meta.read_text())["fingerprint"] == tiny_fingerprint()
    assert tiny_fingerprint(0) != tiny_fingerprint(1)
