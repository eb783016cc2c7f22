"""Presets, a model's own defaults and the option that beats both (docs/architecture.md 3 and 5).

The values are checked against the authors' released code and the paper's text; the precedence
(explicit option > preset named in the request > the model's defaults file > released) both as
the pure resolution and as what the sampler feeds the UNet, through a model folder that carries a
defaults file and is loaded like SD 2.1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from actgen_generator.attention import class_token_weights
from actgen_generator.guidance import gamma_midpoint
from actgen_generator.sampler import GuidedSampler, SampleItem
from actgen_shared.presets import (
    DEFAULTS_FILE,
    FAST,
    PAPER,
    PRESETS,
    RELEASED,
    ModelDefaults,
    read_model_defaults,
    resolve_options,
)
from actgen_shared.schemas import PRESET_FIELDS, GenerationOptions, ItemResult

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_released_preset_is_the_released_code_and_paper_the_text() -> None:
    # hunto/ActGen@f9f3aa7 classification/lib/gen/guided_gen.py: l. 281 CFG, l. 143 margin, l. 345
    # nu, l. 331 F.normalize over dim 1 of [uncond, c] (l. 223-228), l. 262 + 285-288 the mask
    # summed from ones and never normalised, l. 220 the prompt
    assert RELEASED == {
        "guidance_scale": 7.5,
        "contrastive_margin": 100.0,
        "lr": 0.05,
        "grad_norm": "token",
        "update_uncond": True,
        "normalize_mask": False,
        "prompt": "a photo of {}",
        "adv_decoder": "vae",  # l. 310: the pipeline's VAE decodes x0_hat
    }
    # the paper: 5.1 CFG 15, 4.3 rho 200, eq. 11 on c with the gradient's norm, eq. 8 a [0, 1] mask;
    # nu is not in the text (the released 0.05)
    assert PAPER == {
        "guidance_scale": 15.0,
        "contrastive_margin": 200.0,
        "lr": 0.05,
        "grad_norm": "global",
        "update_uncond": False,
        "normalize_mask": True,
        "prompt": "a photo of {}",
        "adv_decoder": "vae",
    }
    # fast: released with eq. 10 through the tiny decoder and eq. 11's backward through c's rows only
    assert FAST == {**RELEASED, "update_uncond": False, "adv_decoder": "tiny"}
    assert set(PRESETS) == {"released", "paper", "fast"}
    for values in PRESETS.values():  # every preset is a valid set of options
        GenerationOptions.model_validate(values)


def test_explicit_beats_preset_beats_model_file_beats_released() -> None:
    toy = ModelDefaults(options={"guidance_scale": 3.0, "lr": 0.01, "prompt": "a drawing of {}"})
    # nothing named, no file: released
    bare = resolve_options(GenerationOptions(), None)
    assert bare.defaults == "released" and bare.model_dump(exclude={"defaults"}) == RELEASED
    # the model's file over released, field by field
    model = resolve_options(GenerationOptions(), toy)
    assert model.defaults == "model"
    assert (model.guidance_scale, model.lr, model.prompt) == (3.0, 0.01, "a drawing of {}")
    assert (model.contrastive_margin, model.normalize_mask) == (100.0, False)  # released where it is silent
    # a preset named in the request beats the model's file, wholly
    paper = resolve_options(GenerationOptions(preset="paper"), toy)
    assert paper.defaults == "paper" and paper.model_dump(exclude={"defaults"}) == PAPER
    released = resolve_options(GenerationOptions(preset="released"), toy)
    assert released.model_dump(exclude={"defaults"}) == RELEASED
    # an explicit option beats all of them
    explicit = resolve_options(GenerationOptions(preset="paper", lr=0.2, prompt="an image of {}"), toy)
    assert (explicit.lr, explicit.prompt, explicit.guidance_scale) == (0.2, "an image of {}", 15.0)
    assert resolve_options(GenerationOptions(guidance_scale=9.0), toy).guidance_scale == 9.0


def test_model_defaults_file_is_read_and_checked(tmp_path: Path) -> None:
    assert read_model_defaults(tmp_path) is None  # no file: the released preset applies
    (tmp_path / DEFAULTS_FILE).write_text(json.dumps({"options": {"num_inference_steps": 10}}))
    with pytest.raises(ValueError, match=rf"{DEFAULTS_FILE}.*num_inference_steps cannot be a model default"):
        read_model_defaults(tmp_path)
    (tmp_path / DEFAULTS_FILE).write_text(json.dumps({"options": {"prompt": "a photo of"}}))
    with pytest.raises(ValueError, match="exactly one"):
        read_model_defaults(tmp_path)
    (tmp_path / DEFAULTS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid model defaults file"):
        read_model_defaults(tmp_path)
    # the shipped digits model keeps the values its ablation chose (docs/ablation-nu-sweep.md)
    digits = read_model_defaults(REPO / "models" / "tiny-digits")
    assert digits is not None and set(digits.options) == set(PRESET_FIELDS)
    resolved = resolve_options(GenerationOptions(), digits)
    assert (resolved.lr, resolved.guidance_scale, resolved.contrastive_margin) == (0.01, 15.0, 200.0)
    assert (resolved.grad_norm, resolved.update_uncond, resolved.normalize_mask) == ("token", True, True)
    assert resolved.prompt == "a photo of {}"  # what it was trained with


# ---------------------------------------------------------------- through the sampler
TOY_DEFAULTS = {"guidance_scale": 2.0, "prompt": "the digit {}"}


@pytest.fixture(scope="module")
def toy(sampler: GuidedSampler, tmp_path_factory: pytest.TempPathFactory) -> GuidedSampler:
    """The fixture's random tiny model copied into a folder with a defaults file, loaded like SD 2.1."""
    from actgen_generator.pipeline import load_pipeline

    folder = tmp_path_factory.mktemp("toy") / "model"
    shutil.copytree(sampler.model.model_id, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"note": "a test", "options": TOY_DEFAULTS}))
    return GuidedSampler(load_pipeline(str(folder), device="cpu"))


def _item(seed: int = 3) -> SampleItem:
    guide = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return SampleItem(guide=guide, class_id=3, class_name="cat", seed=seed)


def _run(sampler: GuidedSampler, **options) -> tuple[torch.Tensor, ItemResult]:
    """One aig item of 2 steps (unless the options say otherwise): its final latent and record."""
    opts = GenerationOptions.model_validate(
        {"mode": "aig", "num_inference_steps": 2, "grad_steps": 0, **options}
    )
    out = sampler([_item()], opts)[0]
    return out.latent, out.record


def test_the_sampler_runs_what_resolves(sampler: GuidedSampler, toy: GuidedSampler) -> None:
    assert toy.model.defaults == ModelDefaults(note="a test", options=TOY_DEFAULTS)
    assert sampler.model.defaults is None  # the builder's random model has no file: released
    # the model's file reaches the UNet: the toy's defaults are the plain model's explicit options
    latent, record = _run(toy)
    same, _ = _run(sampler, **TOY_DEFAULTS)
    torch.testing.assert_close(latent, same)
    assert record.resolved is not None and record.resolved.defaults == "model"
    assert (record.resolved.guidance_scale, record.resolved.prompt) == (2.0, "the digit {}")
    # ... and a named preset or an explicit option beats it
    released, _ = _run(sampler)
    torch.testing.assert_close(_run(toy, preset="released")[0], released)
    torch.testing.assert_close(_run(toy, guidance_scale=7.5, prompt="a photo of {}")[0], released)
    assert float((latent - released).abs().max()) > 1e-3  # the file changed what was made
    # each preset value matters: paper differs from released on the same model and seed
    assert float((_run(sampler, preset="paper")[0] - released).abs().max()) > 1e-3


def test_prompt_template_finds_the_class_tokens_where_the_placeholder_is(sampler: GuidedSampler) -> None:
    tok = sampler.tokenizer
    # "a cat photo of cat": BOS a cat photo of [cat]: the class is the placeholder's, not the first "cat"
    weights = class_token_weights(tok, "cat", "a cat photo of {}")
    assert weights.nonzero().flatten().tolist() == [5]
    two = class_token_weights(tok, "aquarium fish", "{}, in the water")
    assert two.nonzero().flatten().tolist() == [1, 2] and float(two.sum()) == pytest.approx(1.0)
    # a prompt option changes the embeddings the sampler conditions on, and is recorded
    latent, record = _run(sampler, prompt="a cat photo of {}")
    assert record.resolved.prompt == "a cat photo of {}"
    assert float((latent - _run(sampler)[0]).abs().max()) > 1e-3


def test_gamma_midpoint_scales_with_the_steps(sampler: GuidedSampler) -> None:
    assert gamma_midpoint(12.5, 20, 40) == 6.25 and gamma_midpoint(12.5, 40, 40) == 12.5
    assert gamma_midpoint(12.5, 20, None) == 12.5  # fixed: i as given
    # 4 steps at i = 10 stated for 40 steps run as i = 1 stated for none; not as i = 10
    scaled, record = _run(sampler, num_inference_steps=4, image_guidance_strength=10.0)
    fixed, _ = _run(
        sampler, num_inference_steps=4, image_guidance_strength=1.0, image_guidance_reference_steps=None
    )
    unscaled, _ = _run(
        sampler, num_inference_steps=4, image_guidance_strength=10.0, image_guidance_reference_steps=None
    )
    assert record.image_guidance_strength == pytest.approx(1.0)  # the i gamma used
    torch.testing.assert_close(scaled, fixed)
    assert float((scaled - unscaled).abs().max()) > 1e-3
