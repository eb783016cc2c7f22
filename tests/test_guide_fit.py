"""Option ``guide_fit``: a guide of another aspect than the generation size keeps its aspect
(centre-cropped by default, or padded with mid-grey borders) instead of being squashed, in the
guided sampler (on the tiny model) and in the echo sampler alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from actgen_generator.echo import EchoSampler
from actgen_generator.guide_fit import PAD_VALUE, FitPlan, fit_guide, fit_plan
from actgen_generator.sampler import GuidedSampler, SampleItem
from actgen_shared.schemas import GenerationOptions, Mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _thirds(height: int = 32, third: int = 32) -> np.ndarray:
    """A wide guide: red | green | blue, each ``third`` columns (uint8 H x 3*third x 3)."""
    guide = np.zeros((height, 3 * third, 3), dtype=np.uint8)
    for k, colour in enumerate((RED, GREEN, BLUE)):
        guide[:, k * third : (k + 1) * third] = colour
    return guide


def _tensor(guide: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(guide).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.parametrize(
    ("src", "dst", "fit", "plan"),
    [
        ((100, 200), (64, 64), "crop", FitPlan((0, 50, 100, 100), (64, 64), (0, 0, 0, 0))),
        ((300, 100), (64, 128), "crop", FitPlan((125, 0, 50, 100), (64, 128), (0, 0, 0, 0))),
        ((100, 200), (64, 64), "pad", FitPlan((0, 0, 100, 200), (32, 64), (16, 16, 0, 0))),
        ((90, 30), (64, 64), "pad", FitPlan((0, 0, 90, 30), (64, 21), (0, 0, 21, 22))),
        ((100, 200), (64, 64), "stretch", FitPlan((0, 0, 100, 200), (64, 64), (0, 0, 0, 0))),
        ((50, 50), (64, 64), "pad", FitPlan((0, 0, 50, 50), (64, 64), (0, 0, 0, 0))),  # same aspect
    ],
)
def test_fit_plan_geometry(src: tuple[int, int], dst: tuple[int, int], fit: str, plan: FitPlan) -> None:
    assert fit_plan(*src, *dst, fit) == plan  # type: ignore[arg-type]


def test_crop_keeps_the_centre_pad_adds_borders_stretch_squashes() -> None:
    wide = _tensor(_thirds())  # 32 x 96: red | green | blue
    green = torch.tensor([0.0, 1.0, 0.0])[:, None, None]

    crop = fit_guide(wide, 64, 64, "crop")[0]
    assert crop.shape == (3, 64, 64) and torch.allclose(crop, green.expand(3, 64, 64), atol=1e-6)

    pad = fit_guide(wide, 64, 64, "pad")[0]  # the whole guide 21 rows high, centred
    assert pad.shape == (3, 64, 64)
    assert torch.all(pad[:, :21] == PAD_VALUE) and torch.all(pad[:, -22:] == PAD_VALUE)
    middle = pad[:, 32]
    assert middle[:, 2].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)  # red, left
    assert middle[:, 32].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)  # green, centre
    assert middle[:, 61].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)  # blue, right

    stretch = fit_guide(wide, 64, 64, "stretch")[0]  # the old behaviour: all three, squashed
    assert stretch[:, 32, 2].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert not torch.any(stretch == PAD_VALUE)


def test_guide_fit_is_an_option_on_the_wire_defaulting_to_crop() -> None:
    assert GenerationOptions().guide_fit == "crop"
    assert GenerationOptions(guide_fit="pad").guide_fit == "pad"
    with pytest.raises(ValidationError, match="guide_fit"):
        GenerationOptions.model_validate({"guide_fit": "squash"})


def test_the_sampler_guides_with_the_centre_of_a_wide_guide(sampler: GuidedSampler) -> None:
    """The same seed gives the same latents from a wide guide as from its centre square (crop,
    the default); stretching it gives others."""
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 96, 3), dtype=np.uint8)
    centre = np.ascontiguousarray(wide[:, 32:64])

    def latent(guide: np.ndarray, **options: object) -> torch.Tensor:
        opts = GenerationOptions(mode=Mode.ig, num_inference_steps=2, grad_steps=0, **options)  # type: ignore[arg-type]
        item = SampleItem(guide=guide, class_id=0, class_name="cat", seed=3)
        return sampler([item], opts)[0].latent

    cropped = latent(wide)
    assert torch.equal(cropped, latent(centre))
    assert not torch.allclose(latent(wide, guide_fit="stretch"), cropped)


def test_the_echo_sampler_fits_guides_the_same_way() -> None:
    echo = EchoSampler(native_size=64)
    item = SampleItem(guide=_thirds(), class_id=0, class_name="cat", seed=0)
    [crop] = echo([item], GenerationOptions(mode=Mode.ig, num_inference_steps=1, grad_steps=0))
    assert (crop.image == np.array(GREEN, dtype=np.uint8)).all()
    [pad] = echo(
        [item], GenerationOptions(mode=Mode.ig, num_inference_steps=1, grad_steps=0, guide_fit="pad")
    )
    assert (pad.image[:21] == 128).all() and (pad.image[-22:] == 128).all()
    assert tuple(pad.image[32, 32]) == GREEN
