"""The backgrounds generator v2's training and check pieces (issue 25), each fast and by hand.

The trained model's figures come from ``actgen-lab eval-model`` (its model card); these
tests pin the parts that decide them: the class conditioning, the digit-weighted loss, the
saturation measure and the pass/fail of each threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actgen_lab import cli
from actgen_lab.backgrounds import broad_scenes
from actgen_lab.model_eval import EvalReport
from actgen_lab.tiny_recipe import TinyTrainingConfig, build_untrained, class_token_cosines, class_weights
from actgen_lab.tiny_unet_training import attach_probe, digit_cell_weights, mask_targets, weighted_mse
from actgen_lab.tiny_vae_training import colour_saturation, finetune_decoder
from actgen_shared.labels import DIGITS


def _off_diagonal(c: np.ndarray) -> np.ndarray:
    return c[~np.eye(len(c), dtype=bool)]


def test_orthogonal_class_tokens_separate_the_classes_the_random_encoder_does_not() -> None:
    random = _off_diagonal(class_token_cosines(build_untrained(0, "backgrounds"), list(DIGITS)))
    ortho_pipe = build_untrained(0, "backgrounds", "orthogonal", 8.0)
    ortho = _off_diagonal(class_token_cosines(ortho_pipe, list(DIGITS)))
    assert random.mean() > 0.5  # the frozen random encoder: every class token looks alike
    assert ortho.mean() < 0.1 and ortho.max() < 0.3
    emb = ortho_pipe.text_encoder.get_input_embeddings().weight
    ids = [ortho_pipe.tokenizer(n, add_special_tokens=False).input_ids[0] for n in DIGITS]
    rows = emb[ids]
    gram = rows @ rows.T
    assert torch.allclose(gram, 64.0 * torch.eye(len(DIGITS)), atol=1e-3)  # orthogonal, norm 8
    assert not ortho_pipe.text_encoder.get_input_embeddings().weight.requires_grad  # frozen


def test_unknown_class_token_mode_is_named() -> None:
    with pytest.raises(ValueError, match="class_tokens"):
        build_untrained(0, "backgrounds", "learned")


def test_weighted_mse_weighs_the_digit_cells() -> None:
    pred, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    target[0, :, 0, 0] = 1.0  # error only in cell (0, 0)
    assert math.isclose(float(weighted_mse(pred, target, None)), 0.25)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # the digit fills cell (0, 0) of the 2x2 latent
    w = digit_cell_weights(masks, 2, 4.0)
    assert w.shape == (1, 1, 2, 2) and float(w[0, 0, 0, 0]) == 5.0 and float(w[0, 0, 1, 1]) == 1.0
    assert math.isclose(float(weighted_mse(pred, target, w)), 5.0 / 8.0)  # 5 of 8 weight units
    assert math.isclose(float(weighted_mse(pred, target, torch.ones_like(w))), 0.25)


def test_colour_saturation_by_hand() -> None:
    grey = np.full((1, 2, 2, 3), 128, np.uint8)
    red = np.zeros((1, 2, 2, 3), np.uint8)
    red[..., 0] = 200
    half = np.concatenate([grey, red])
    red_std = float(np.std([200 / 255, 0.0, 0.0]))
    assert colour_saturation(grey) == 0.0
    assert math.isclose(colour_saturation(red), red_std)
    assert math.isclose(colour_saturation(half), red_std / 2)
    assert colour_saturation(np.zeros((1, 2, 2, 3), np.uint8)) == 0.0


def _report(**over) -> EvalReport:
    values = dict(
        model="m",
        reference_accuracy=0.98,
        random_accuracy=0.9,
        aig_faithfulness=0.9,
        aig_guide_accuracy=0.98,
        diversity=0.1,
        real_diversity=0.3,
        n_random=100,
        n_aig=100,
        n_diversity_guides=10,
        seeds_per_guide=4,
        num_inference_steps=20,
        guidance_scale=15.0,
        image_guidance_strength=6.25,
        seconds=1.0,
        data="backgrounds",
        mask_iou=0.5,
        uniform_mask_iou=0.2,
        change_inside=0.1,
        change_outside=0.2,
        ig_faithfulness=0.95,
        ig_kind_kept=0.8,
        aig_kind_changed=0.5,
        kind_accuracy=0.9,
        saturation_kept=0.8,
        saturation_real=0.3,
        saturation_random=0.25,
    )
    values.update(over)
    return EvalReport(**values)  # type: ignore[arg-type]


def test_every_threshold_passes_at_its_value_and_fails_below() -> None:
    report = _report()
    assert [name for name, *_ in report.checks()] == [
        "random: prompt's digit",
        "ig: guide's digit",
        "aig: guide's digit",
        "aig: background kind changed",
        "ig: background kind kept",
        "VAE: saturation kept",
        "eq. 8 mask IoU",
        "aig change outside / inside the digit",
    ]
    assert report.passed and "FAIL" not in report.text()
    for field, low in [
        ("random_accuracy", 0.89),
        ("ig_faithfulness", 0.94),
        ("aig_faithfulness", 0.89),
        ("aig_kind_changed", 0.49),
        ("ig_kind_kept", 0.79),
        ("saturation_kept", 0.79),
        ("mask_iou", 0.49),
        ("change_outside", 0.19),  # 1.9x the change inside
    ]:
        worse = _report(**{field: low})
        failed = [name for name, _, _, ok in worse.checks() if not ok]
        assert len(failed) == 1, (field, failed)
        assert not worse.passed and f"{failed[0]}: " in worse.text() and "FAIL" in worse.text()
    assert not _report(ig_faithfulness=None).passed  # a figure not measured is no pass


def test_training_flags_that_need_backgrounds_are_named(tmp_path, capsys) -> None:
    for flag in ("--digit-weight", "--checkpoint-every"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["train-tiny-model", "--data", "digits", "--out", str(tmp_path / "m"), flag, "2"])
        assert flag in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        cli.main(
            [
                "train-tiny-model",
                "--data",
                "backgrounds",
                "--out",
                str(tmp_path / "m"),
                "--colour-weight",
                "-1",
            ]
        )
    assert "--colour-weight" in str(exc.value)
    assert not (tmp_path / "m").exists()


def test_decoder_fine_tuning_leaves_the_encoder_and_so_the_latents_alone() -> None:
    vae = build_untrained(0, "backgrounds").vae
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    cfg = TinyTrainingConfig(data="backgrounds", vae_batch=4, warmup_steps=1, colour_weight=1.0)
    summary = finetune_decoder(vae, images, cfg, 3, 60.0, torch.Generator().manual_seed(0))
    assert summary["steps"] == 3 and math.isfinite(summary["final_recon_loss"])
    assert all(torch.equal(encoder[k], v) for k, v in vae.encoder.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in vae.decoder.state_dict().items())
    assert not any(p.requires_grad for p in vae.parameters())  # frozen again


def test_pooled_text_conditions_every_block_through_the_time_embedding(tmp_path) -> None:
    """v3's conditioning: the same UNet class and call (the generator loads it as SD 2.1's), and a
    prompt that differs only in its class token changes the UNet's output even with the
    cross-attention switched off, which v2's UNet cannot do."""
    from diffusers import UNet2DConditionModel

    plain = build_untrained(0, "backgrounds", "orthogonal", 8.0).unet
    pooled_pipe = build_untrained(0, "backgrounds", "orthogonal", 8.0, pooled_text=True)
    pooled = pooled_pipe.unet
    assert pooled.config.addition_embed_type == "text" and plain.config.addition_embed_type is None
    ids = [
        pooled_pipe.tokenizer(f"a photo of {n}", padding="max_length", return_tensors="pt").input_ids
        for n in ("three", "six")
    ]
    with torch.no_grad():
        text = torch.cat([pooled_pipe.text_encoder(i)[0] for i in ids])
    latents = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)

    def without_cross_attention(unet: UNet2DConditionModel) -> torch.Tensor:
        for block in unet.modules():  # attention to the prompt is what the v2 UNet listens through
            if hasattr(block, "attn2"):
                block.attn2.to_out[0].weight.data.zero_()
                block.attn2.to_out[0].bias.data.zero_()
        with torch.no_grad():
            out = unet(latents, torch.tensor(500), text).sample
        return (out[0] - out[1]).abs().max()

    assert float(without_cross_attention(plain)) < 1e-6
    assert float(without_cross_attention(pooled)) > 1e-4
    pooled.save_pretrained(tmp_path / "unet")  # and it loads as any diffusers UNet
    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert again.config.addition_embed_type == "text"


def test_vae_steps_zero_keeps_an_initial_vae_and_needs_one(capsys) -> None:
    with pytest.raises(SystemExit, match="--vae-steps must be >= 1"):
        cli.main(["train-tiny-model", "--data", "backgrounds", "--out", "x", "--vae-steps", "0"])


@pytest.mark.parametrize(
    ("train", "truth"), [("train_digit_classifier", "labels"), ("train_kind_classifier", "kinds")]
)
def test_judges_learn_the_vae_reconstructions_beside_the_originals(
    monkeypatch, train: str, truth: str
) -> None:
    """The judges read generated images, which the VAE draws: each is fitted on the pool's originals
    and their reconstructions, labelled alike (judges of originals alone read 0.78 (the digit) and
    0.28 (the kind) of v4's reconstructions)."""
    from actgen_lab import tiny_unet_training
    from actgen_lab.backgrounds import broad_scenes
    from actgen_lab.tiny_recipe import to_model_pixels
    from actgen_lab.tiny_vae_training import reconstruct

    seen: dict[str, torch.Tensor] = {}

    def fit(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch: int) -> str:
        seen["x"], seen["y"] = x, y
        return "judge"

    monkeypatch.setattr(tiny_unet_training.ReferenceClassifier, "fit", fit)
    vae = build_untrained(0, "backgrounds").vae.eval()
    pool = broad_scenes(1, 1, hard_share=0.5)
    assert getattr(tiny_unet_training, train)(renders=1, vae=vae) == "judge"
    n = len(pool.images)
    assert seen["x"].shape[0] == 2 * n and torch.equal(seen["y"][:n], seen["y"][n:])
    assert torch.equal(seen["y"][:n], torch.from_numpy(getattr(pool, truth)))
    assert torch.equal(seen["x"][:n], to_model_pixels(pool.images))
    assert torch.equal(seen["x"][n:], to_model_pixels(reconstruct(vae, pool.images)))
    getattr(tiny_unet_training, train)(renders=1)  # no VAE: the originals alone
    assert seen["x"].shape[0] == n


def test_judges_command_names_a_folder_that_is_not_a_backgrounds_model(tmp_path) -> None:
    (tmp_path / "vae").mkdir()
    with pytest.raises(SystemExit, match="not a backgrounds model folder"):
        cli.main(["judges", str(tmp_path)])
    assert not (tmp_path / "kind_classifier.safetensors").exists()
    assert not (tmp_path / "reference_classifier.safetensors").exists()


def test_eval_model_names_an_option_out_of_a_requests_range_before_it_loads_anything(tmp_path) -> None:
    (tmp_path / "vae").mkdir()  # a folder, not a model: the options are checked first
    with pytest.raises(SystemExit, match="image_guidance_strength"):
        cli.main(["eval-model", str(tmp_path), "--image-guidance-strength", "5000"])


def test_judges_command_replaces_both_judges_and_reports_their_readings(
    tmp_path, monkeypatch, capsys
) -> None:
    """The command on the shipped model's folder (a copy), with one-epoch judges to stay fast: both
    files are replaced by loadable judges, no partial file is left, and each judge's accuracy on the
    test split and on its reconstructions is printed."""
    import re
    import shutil
    from pathlib import Path

    from actgen_lab import model_eval
    from actgen_lab.backgrounds import ReferenceClassifier

    model = tmp_path / "model"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "tiny-backgrounds", model)
    files = ("reference_classifier.safetensors", "kind_classifier.safetensors")
    before = {f: (model / f).read_bytes() for f in files}
    for name in ("train_digit_classifier", "train_kind_classifier"):
        real = getattr(model_eval, name)
        monkeypatch.setattr(model_eval, name, lambda vae, real=real: real(renders=1, epochs=1, vae=vae))
    assert cli.main(["judges", str(model)]) == 0
    printed = capsys.readouterr().out
    for name in ("digit", "kind"):
        found = re.search(
            rf"{name} accuracy ([0-9.]+) on the test split, ([0-9.]+) on its VAE reconstructions", printed
        )
        assert found, printed
        assert all(0.1 < float(v) <= 1 for v in found.groups())  # ten digits, ten kinds: chance is 0.1
    for f in files:
        after = (model / f).read_bytes()
        assert after != before[f] and not (model / (f + ".partial")).exists()
        ReferenceClassifier.load(model / f)


def test_round_trip_figures_score_a_perfect_copy_and_the_guide_itself() -> None:
    """(e) and (g) read through the VAE, so eval-model reports what a perfect copy scores: an aig
    image that is exactly the guide's round trip changed nothing beyond the VAE (0 inside and out),
    the guide itself changed exactly what the round trip loses, and the kind ceiling is the judge's
    agreement between each guide and its round trip."""
    from pathlib import Path

    from actgen_generator.diffusers_classes import AutoencoderKL
    from actgen_lab.backgrounds import ReferenceClassifier, load_backgrounds_split
    from actgen_lab.model_eval import round_trip_figures
    from actgen_lab.testbed import change_by_region
    from actgen_lab.tiny_vae_training import reconstruct

    folder = Path(__file__).resolve().parents[1] / "models" / "tiny-backgrounds"
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    judge = ReferenceClassifier.load(folder / "kind_classifier.safetensors")
    test = load_backgrounds_split().test
    guides, masks = test.images[:40], test.masks[:40]
    copies = reconstruct(vae, guides)

    perfect = round_trip_figures(vae, judge, guides, masks, copies)
    assert perfect["change_inside_from_copy"] == 0.0 == perfect["change_outside_from_copy"]
    floor = (perfect["change_inside_copy"], perfect["change_outside_copy"])
    assert floor == change_by_region(copies, guides, masks) and min(floor) > 0  # the VAE loses detail
    agree = float(np.mean(judge.predict(copies) == judge.predict(guides)))
    assert perfect["ig_kind_kept_copy"] == agree and 0.5 < agree < 1.0  # the judge misreads some copies

    itself = round_trip_figures(vae, judge, guides, masks, guides)
    assert (itself["change_inside_from_copy"], itself["change_outside_from_copy"]) == floor


def test_the_report_prints_each_figure_beside_what_a_copy_scores() -> None:
    plain = _report().text()
    assert "round trip" not in plain  # not measured: not printed
    text = _report(
        ig_kind_kept=0.72,
        ig_kind_kept_copy=0.8,
        change_inside_copy=0.06,
        change_outside_copy=0.04,
        change_inside_from_copy=0.05,
        change_outside_from_copy=0.15,
        mask_inside=0.645,
        mask_outside=0.131,
        cell_mask_inside=0.652,
        cell_mask_outside=0.071,
    ).text()
    assert "eq. 8's mask, mean inside / outside the digit: 0.645 / 0.131 (the true digit pooled" in text
    assert "latent grid: 0.652 / 0.071)" in text
    assert "a VAE round trip of the same guides keeps it 0.800 (ig / round trip 0.90)" in text
    assert "aig from that round trip: 0.050 / 0.150 (outside / inside 3.00)" in text
    assert "ig: background kind kept: 0.720 (>= 0.8: FAIL)" in text  # the threshold reads the raw figure


def test_the_16x16_architecture_reads_eq_8s_mask_on_its_latent_grid() -> None:
    """v5 (``--latent-side 16``): latents and the class-token maps eq. 8 reads are 16x16, and on
    that grid a digit's cells are mostly digit, where at 8x8 they are mostly background (what
    bounded v4's change outside / inside the digit)."""
    pipe = build_untrained(0, "backgrounds", "orthogonal", 8.0, pooled_text=True, latent_side=16)
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
    assert z.shape == (2, 4, 16, 16)
    probe = attach_probe(pipe.unet)
    assert probe.factor == 1  # the sampler's recorder sits on the same layers
    ids = pipe.tokenizer(["a photo of three"] * 2, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        probe.weights, probe.recording = class_weights(pipe.tokenizer, list(DIGITS))[0, [3, 3]], True
        pipe.unet(torch.randn(2, 4, 16, 16), torch.tensor(500), text)
    assert probe.take().shape == (2, 16 * 16)

    masks = torch.from_numpy(broad_scenes(1, 0).masks[:200])
    share: dict[int, tuple[float, float]] = {}
    for side in (8, 16):
        cells = F.interpolate(mask_targets(masks, side, 1).view(-1, 1, side, side), size=32, mode="nearest")
        inside = float(cells[:, 0][masks].mean())
        outside = float(cells[:, 0][~masks].mean())
        share[side] = (inside, outside)
    assert share[16][0] > share[8][0] + 0.1 and share[16][1] < share[8][1] / 1.5, share

    with pytest.raises(ValueError, match="digits at latent side 16; known"):
        build_untrained(0, "digits", latent_side=16)
    with pytest.raises(SystemExit, match="--latent-side 16 needs --data backgrounds"):
        cli.main(["train-tiny-model", "--data", "digits", "--out", "x", "--latent-side", "16"])
