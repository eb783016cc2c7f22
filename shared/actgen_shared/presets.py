"""What a job runs with where its options say nothing: the presets, a model's own defaults, and the
one function that resolves them (docs/architecture.md 3 and 5).

Field by field, the first that has a value wins:

1. the option the request sets;
2. the preset the request names (``options.preset``);
3. the model's defaults file (``actgen_defaults.json`` in its folder: values tuned on that model);
4. the ``released`` preset.

A request that names a preset gets exactly that preset (its model's file does not apply), so
``preset: "paper"`` means the same on SD 2.1 and on a toy model. The resolution needs the model's
file, so it happens where the model is loaded (the sampler), never in an API-only replica.

Pure and torch-free: the trainer and the API import it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actgen_shared.schemas import PRESET_FIELDS, GenerationOptions, PresetName, ResolvedOptions

DEFAULTS_FILE = "actgen_defaults.json"  # a model's own defaults, in its diffusers folder
PLACEHOLDER = "{}"  # where the class name goes in options.prompt

# The settings of the authors' released code, hunto/ActGen at f9f3aa7 (read, not copied), file
# classification/lib/gen/guided_gen.py:
RELEASED: dict[str, Any] = {
    "guidance_scale": 7.5,  # l. 281: guidance_scale = 7.5 (the paper's text: 15)
    "contrastive_margin": 100.0,  # l. 143: cal_contrastive_loss(..., margin=100) (text: 200)
    "lr": 0.05,  # l. 345: prompt_embeds - 0.05 * grad
    "grad_norm": "token",  # l. 331: F.normalize(grad), dim=1 of (2, 77, D): each channel over the tokens
    "update_uncond": True,  # l. 223-228: _encode_prompt(..., do_classifier_free_guidance=True) is
    # [uncond, c]; l. 325-345 differentiate and move both
    "normalize_mask": False,  # l. 262: the map starts as ones; l. 285-288: each step's added, never
    # normalised (so m >= 1 everywhere: the background is guided too)
    "prompt": "a photo of {}",  # l. 205, 220
    "adv_decoder": "vae",  # l. 310: self.pipeline.vae.decode(latents_convert)
}

# The paper's text (sections 3.2, 4.2, 4.3, 5.1). It states no nu: the released code's is used.
PAPER: dict[str, Any] = {
    "guidance_scale": 15.0,  # 5.1: "The guidance scale s of classifier-free guidance is set to 15"
    "contrastive_margin": 200.0,  # 4.3: "The hyper-parameter rho = 200 signifies the margin"
    "lr": 0.05,  # eq. 11 names nu but no value; the released code's 0.05
    "grad_norm": "global",  # eq. 11: grad / ||grad_c L||_2, the norm of the whole gradient of c
    "update_uncond": False,  # eq. 11 updates c, the text condition; the unconditional one stays
    # eq. 8 is a Hadamard mask that "restricts interpolations to the foreground areas", with
    # gamma_t "ranging within 0 and 1": x~ stays between x and x^g only for m in [0, 1], and the
    # background is left free (4.2: "keeping the flexibility of background"). So the map is scaled
    # to [0, 1]; an unnormalised sum from ones (the released code) guides the background fully.
    "normalize_mask": True,
    "prompt": "a photo of {}",  # 3.2: "the fixed text condition a photo of <class>"
    "adv_decoder": "vae",  # eq. 10: D(x0_hat), the diffusion model's own decoder
}

# Released, at a fraction of eq. 10/11's cost (issue 26; docs/benchmarks.md says what each change
# costs in fidelity): eq. 10 decodes x0_hat through the model's tiny surrogate decoder (TAESD for
# SD 2.1) instead of the VAE, and eq. 11 moves c alone, so its backward runs through the
# conditional rows only (half the CFG batch), as the paper's text reads eq. 11.
FAST: dict[str, Any] = {**RELEASED, "update_uncond": False, "adv_decoder": "tiny"}

PRESETS: dict[PresetName, dict[str, Any]] = {"released": RELEASED, "paper": PAPER, "fast": FAST}
FALLBACK: PresetName = "released"  # a model without a defaults file, a request naming no preset
if any(set(values) != set(PRESET_FIELDS) for values in PRESETS.values()):
    raise RuntimeError("every preset must give a value to each field of PRESET_FIELDS")


class ModelDefaults(BaseModel):
    """A model's ``actgen_defaults.json``: option values chosen on that model, and why."""

    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, description="where the values come from")
    options: dict[str, Any] = Field(default_factory=dict, description="a subset of PRESET_FIELDS")

    @model_validator(mode="after")
    def _known_and_valid(self) -> ModelDefaults:
        unknown = sorted(set(self.options) - set(PRESET_FIELDS))
        if unknown:
            raise ValueError(
                f"options.{unknown[0]} cannot be a model default (only {', '.join(PRESET_FIELDS)})"
            )
        GenerationOptions.model_validate(self.options)  # the request's ranges and prompt rules
        return self


def read_model_defaults(folder: str | Path) -> ModelDefaults | None:
    """The defaults file of a model folder, None when it has none; a bad file raises ValueError."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return None
    try:
        return ModelDefaults.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ValueError(f"{path} is not a valid model defaults file: {problems}") from None
    except ValueError as exc:  # not JSON
        raise ValueError(f"{path} is not a valid model defaults file: {exc}") from None


def resolve_options(options: GenerationOptions, model_defaults: ModelDefaults | None) -> ResolvedOptions:
    """The preset-dependent options a job runs with (precedence in the module docstring)."""
    source: Literal["released", "paper", "fast", "model"]
    if options.preset is not None:
        base, source = PRESETS[options.preset], options.preset
    elif model_defaults is not None:
        base, source = {**PRESETS[FALLBACK], **model_defaults.options}, "model"
    else:
        base, source = PRESETS[FALLBACK], FALLBACK
    explicit = {name: getattr(options, name) for name in PRESET_FIELDS if getattr(options, name) is not None}
    return ResolvedOptions(defaults=source, **{**base, **explicit})


def prompt_text(template: str, class_name: str) -> str:
    """The prompt of one class: the template with its one ``{}`` replaced (no str.format: a
    template from a request is text, never a format program)."""
    return template.replace(PLACEHOLDER, class_name, 1)


__all__ = [
    "DEFAULTS_FILE",
    "FALLBACK",
    "FAST",
    "PAPER",
    "PLACEHOLDER",
    "PRESETS",
    "RELEASED",
    "ModelDefaults",
    "prompt_text",
    "read_model_defaults",
    "resolve_options",
]
