"""Eq. 10 through a tiny surrogate decoder (``adv_decoder: tiny``) and the ``fast`` preset (issue 26).

The tiny model gets a small random ``AutoencoderTiny`` in its folder's ``tiny_vae/``; the checks:
the loader finds it relative to the folder, the adversarial loss decodes through it with its own
latent scaling while the returned image stays the VAE's, ``fast`` moves c alone through the
conditional rows, and a model without a tiny decoder refuses ``tiny`` by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from actgen_generator.diffusers_classes import AutoencoderTiny
from actgen_generator.pipeline import TINY_VAE_DIR, load_pipeline
from actgen_generator.sampler import Classifier, GuidedSampler, SampleItem
from actgen_lab.tiny_decoder import DistilConfig, tiny_config
from actgen_shared.architectures import build_classifier
from actgen_shared.labels import CIFAR10
from actgen_shared.schemas import GenerationOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_tiny_vae(folder: Path, scaling_factor: float = 1.0, seed: int = 0) -> None:
    vae_scale = 2 ** (len(AutoencoderTiny.load_config(str(folder / "vae"))["block_out_channels"]) - 1)
    config = tiny_config(vae_scale, 4, DistilConfig(channels=8, blocks=1))
    torch.manual_seed(seed)
    tiny = AutoencoderTiny(**{**config, "scaling_factor": scaling_factor})
    tiny.save_pretrained(str(folder / TINY_VAE_DIR), safe_serialization=True)


@pytest.fixture(scope="module")
def with_tiny(sampler: GuidedSampler, tmp_path_factory: pytest.TempPathFactory) -> GuidedSampler:
    """The fixture's tiny model copied with a tiny decoder beside its components, then moved: the
    decoder is found relative to wherever the folder lives."""
    first = tmp_path_factory.mktemp("with-tiny") / "model"
    shutil.copytree(sampler.model.model_id, first)
    _write_tiny_vae(first)
    moved = first.parent / "moved"
    first.rename(moved)
    return GuidedSampler(load_pipeline(str(moved), device="cpu"))


def _classifier(size: int) -> Classifier:
    torch.manual_seed(0)
    return Classifier(build_classifier("simple_cnn", 10).eval(), size, (0.5,) * 3, (0.5,) * 3)


def _items(n: int) -> list[SampleItem]:
    rng = np.random.default_rng(0)
    return [
        SampleItem(
            guide=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            class_id=i % 10,
            class_name=CIFAR10[i % 10],
            seed=20 + i,
        )
        for i in range(n)
    ]


def _options(**extra) -> GenerationOptions:
    return GenerationOptions.model_validate(
        {
            "mode": "actgen",
            "num_inference_steps": 3,
            "grad_steps": 2,
            "adv_prob": 1.0,
            "bank_sample": 0,
            **extra,
        }
    )


def _count_calls(module: torch.nn.Module, seen: list[tuple[int, ...]]):  # type: ignore[no-untyped-def]
    return module.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))


def test_the_tiny_decoder_is_found_beside_the_model_and_only_there(with_tiny: GuidedSampler, sampler) -> None:
    assert with_tiny.tiny_vae is not None and isinstance(with_tiny.tiny_vae, AutoencoderTiny)
    assert not any(p.requires_grad for p in with_tiny.tiny_vae.parameters())
    assert sampler.tiny_vae is None  # the plain tiny model ships none


def test_eq10_decodes_through_the_tiny_decoder_and_the_image_is_the_vaes(with_tiny: GuidedSampler) -> None:
    """adv_decoder tiny: every guided step's decode goes through the tiny decoder (the VAE decodes only
    the final image), and the images are the VAE's decode of the returned latents."""
    classifier = _classifier(with_tiny.model.native_size)
    assert with_tiny.tiny_vae is not None
    vae_calls: list[tuple[int, ...]] = []
    tiny_calls: list[tuple[int, ...]] = []
    hooks = [
        _count_calls(with_tiny.vae.decoder, vae_calls),
        _count_calls(with_tiny.tiny_vae.decoder, tiny_calls),
    ]
    try:
        out = with_tiny(_items(2), _options(adv_decoder="tiny"), classifier=classifier)
        n_vae, n_tiny = len(vae_calls), len(tiny_calls)
        ref = with_tiny(_items(2), _options(), classifier=classifier)
    finally:
        for h in hooks:
            h.remove()
    assert (n_vae, n_tiny) == (1, 2)  # 2 guided steps through the tiny decoder; 1 final decode
    assert len(vae_calls) - n_vae == 3 and len(tiny_calls) == n_tiny  # the default: the VAE, 2 + 1
    images = with_tiny._decode(torch.stack([o.latent for o in out]), None)
    for o, img in zip(out, images, strict=True):
        assert np.array_equal(o.image, img)
        assert o.record.resolved.adv_decoder == "tiny"
    assert not torch.equal(out[0].latent, ref[0].latent)  # a different decoder, a different gradient


def test_each_decoder_reads_latents_divided_by_its_own_scaling_factor(
    with_tiny: GuidedSampler, sampler: GuidedSampler, tmp_path: Path
) -> None:
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(with_tiny.adv_latents(x0, 32, "tiny"), x0)  # scaling_factor 1.0: as they are (TAESD)
    torch.testing.assert_close(with_tiny.adv_latents(x0, 32, "vae"), x0 / with_tiny.scaling_factor)
    folder = tmp_path / "model"
    shutil.copytree(sampler.model.model_id, folder)
    _write_tiny_vae(folder, scaling_factor=2.0)
    other = GuidedSampler(load_pipeline(str(folder), device="cpu"))
    torch.testing.assert_close(other.adv_latents(x0, 32, "tiny"), x0 / 2.0)
    # the decode the loss sees is the tiny decoder's output on exactly those latents
    assert other.tiny_vae is not None
    with torch.no_grad():
        torch.testing.assert_close(
            other.adv_decode_image(x0, 32, "tiny"), other.tiny_vae.decode(x0 / 2.0).sample
        )


def test_the_fast_preset_moves_c_alone_through_the_tiny_decoder(with_tiny: GuidedSampler) -> None:
    """fast = released + tiny decoder + backward through the conditional rows: the unconditional rows
    of a guided step run without a graph (one leaf, c), and the record says what ran."""
    classifier = _classifier(with_tiny.model.native_size)
    seen: list[int] = []
    original = with_tiny.predict_noise

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        pred = original(*args, **kwargs)
        if pred.leaves:
            seen.append(len(pred.leaves))
        return pred

    with_tiny.predict_noise = spy  # type: ignore[method-assign]
    try:
        fast = with_tiny(_items(2), _options(preset="fast"), classifier=classifier)
        released = with_tiny(_items(2), _options(preset="released"), classifier=classifier)
    finally:
        del with_tiny.predict_noise
    assert seen == [1, 1, 2, 2]  # fast: c alone; released: [uncond, c]
    res = fast[0].record.resolved
    assert (res.defaults, res.adv_decoder, res.update_uncond) == ("fast", "tiny", False)
    assert released[0].record.resolved.adv_decoder == "vae"
    assert all(len(o.record.grad_records) == 2 for o in fast)


def test_tiny_without_a_tiny_decoder_is_refused_by_name(sampler: GuidedSampler) -> None:
    classifier = _classifier(sampler.model.native_size)
    with pytest.raises(ValueError, match="options.adv_decoder 'tiny'.*has none"):
        sampler(_items(1), _options(adv_decoder="tiny"), classifier=classifier)
    with pytest.raises(ValueError, match="preset 'fast'"):
        sampler(_items(1), _options(preset="fast"), classifier=classifier)
    # no adversarial item, no decode: tiny is harmless there
    out = sampler(_items(1), _options(adv_decoder="tiny", adv_prob=0.0))
    assert out[0].record.resolved.adv_decoder == "tiny"
    with pytest.raises(ValueError):
        GenerationOptions.model_validate({"adv_decoder": "taesd"})
