"""The oracle generator (actgen_lab.oracle): each mode draws what its mechanism promises, through
the service contract the trainer's link speaks, and a miniature oracle grid runs the real loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actgen_lab import ablation
from actgen_lab import backgrounds as bg
from actgen_lab.oracle import OracleClient
from actgen_shared.architectures import build_classifier
from actgen_shared.codecs import png_encode
from actgen_shared.run import model_weights
from actgen_shared.schemas import JobStatus

GUIDES = [3, 8, 21, 40]  # train scenes


@pytest.fixture(scope="module")
def split() -> bg.BackgroundsSplit:
    return bg.load_backgrounds_split()


def _job(split: bg.BackgroundsSplit, options: dict, guides=GUIDES, **extra) -> dict:
    import base64

    return {
        "run_id": "oracle-test",
        "epoch": 0,
        "label_set": "digits",
        "memory_bank_key": "oracle-test",
        "items": [
            {
                "image": base64.b64encode(png_encode(split.train.images[g])).decode(),
                "class_id": int(split.train.labels[g]),
                "guide_id": f"train-{g}",
            }
            for g in guides
        ],
        "options": {"seed": 5, **options},
        **extra,
    }


def _images(client: OracleClient, run_id: str = "oracle-test") -> list[np.ndarray]:
    from actgen_shared.codecs import image_from_b64

    page = client.results(run_id, after="0-0", limit=1000)
    return [np.asarray(image_from_b64(item.image))[..., :3] for item in page.items]


def test_modes_draw_what_their_mechanism_promises(split) -> None:
    client = OracleClient()
    train = split.train
    # ig: the guide's digit in place, on its own kind and colours
    accepted = client.submit(_job(split, {"mode": "ig"}))
    assert client.wait(accepted.job_id).status is JobStatus.done
    for g, image in zip(GUIDES, _images(client), strict=True):
        mask = train.masks[g]
        inside = np.abs(image[mask].astype(int) - train.images[g][mask].astype(int)).mean()
        assert inside < 6  # the digit and its colour kept (edges blend with the redrawn pattern)
        assert (
            np.abs(image[~mask].astype(float).mean(0) - train.images[g][~mask].astype(float).mean(0)).max()
            < 40
        )
    # aig: the same digit, the background changed (another kind, other colours)
    client = OracleClient()
    client.submit(_job(split, {"mode": "aig"}))
    for g, image in zip(GUIDES, _images(client), strict=True):
        mask = train.masks[g]
        inside = np.abs(image[mask].astype(int) - train.images[g][mask].astype(int)).mean()
        outside = np.abs(image[~mask].astype(int) - train.images[g][~mask].astype(int)).mean()
        assert outside > 3 * inside
    # guides: the guide itself; random: a class-true scene that is not the guide
    client = OracleClient(policy="guides")
    client.submit(_job(split, {"mode": "ig"}))
    assert all(np.array_equal(i, train.images[g]) for g, i in zip(GUIDES, _images(client), strict=True))
    client = OracleClient()
    client.submit(_job(split, {"mode": "random"}))
    assert not any(np.array_equal(i, train.images[g]) for g, i in zip(GUIDES, _images(client), strict=True))


@pytest.mark.parametrize(
    ("policy", "share"), [("draw", bg.HARD_SHARE_TRAIN), ("pool-styles", bg.HARD_SHARE_POOL)]
)
def test_random_draws_the_hard_style_as_its_policy_says(
    split, monkeypatch, policy: str, share: float
) -> None:
    """random draws the hard style as rarely as training (draw) or as often as the testbed's
    generator learnt it (pool-styles, half): 400 items, counted where the scene is composed."""
    from actgen_lab import oracle

    styles: list[int] = []
    real_compose = oracle.compose

    def compose(digit, label, kind, style, *args, **kwargs):
        styles.append(int(style))
        return real_compose(digit, label, kind, style, *args, **kwargs)

    monkeypatch.setattr(oracle, "compose", compose)
    client = OracleClient(policy=policy)
    client.submit(_job(split, {"mode": "random"}, guides=GUIDES * 100))
    assert len(styles) == 400
    assert abs(np.mean(styles) - share) < 4 * np.sqrt(share * (1 - share) / 400)  # within 4 standard errors


def test_contrastive_never_repeats_a_kind_for_one_guide(split) -> None:
    client = OracleClient()
    g = GUIDES[0]
    job = _job(split, {"mode": "actgen", "adv_prob": 0.0, "bank_sample": 64}, guides=[g] * 9)
    client.submit(job)
    kinds = client.drawn_kinds
    assert int(split.train.kinds[g]) not in kinds and len(set(kinds)) == 9  # every other kind once
    client.submit(job)  # all used: the next nine start over, again all distinct
    assert len(set(client.drawn_kinds[9:])) == 9
    # plain aig draws another kind too, but may repeat
    client = OracleClient()
    client.submit(_job(split, {"mode": "aig"}, guides=[g] * 30))
    assert int(split.train.kinds[g]) not in client.drawn_kinds and len(set(client.drawn_kinds)) < 30


def test_adversarial_items_take_the_kind_the_classifier_finds_hardest(split) -> None:
    client = OracleClient()
    torch.manual_seed(0)
    net = build_classifier("tiny_cnn", 10).eval()
    meta = {
        "architecture": "tiny_cnn",
        "num_classes": 10,
        "input_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    ref = client.upload_classifier(model_weights(net), meta).ref
    g = GUIDES[1]
    job = _job(split, {"mode": "actgen", "adv_prob": 1.0, "bank_sample": 0}, guides=[g], classifier_ref=ref)
    state = client.status(client.submit(job).job_id)
    assert state.result is not None and state.result.items[0].adversarial
    (image,) = _images(client)
    # the image's loss is the highest among the guide's digit on all ten kinds (same draw)
    classifier = client.classifiers[ref]
    label = int(split.train.labels[g])
    loss = classifier.losses(image[None], label)[0]
    draws = np.random.default_rng([5, 1])  # the job's stream: the adv_prob draw, then the render seed
    draws.random()
    seed = int(draws.integers(2**31))
    renders = np.stack(
        [
            bg.rerender(split.train, g, np.random.default_rng(seed), kind=k, new_colours=True)[0]
            for k in range(len(bg.BACKGROUND_KINDS))
        ]
    )
    assert loss == pytest.approx(classifier.losses(renders, label).max(), rel=1e-5)


def test_through_vae_returns_the_draw_policys_images_after_the_models_vae(split) -> None:
    """policy through-vae (docs/ablation.md 8.10): the images ``draw`` gives for the same job, each
    encoded and decoded by the model's VAE, which keeps the class's look but not every pixel."""
    from actgen_generator.diffusers_classes import AutoencoderKL
    from actgen_lab.tiny_vae_training import reconstruct

    model = str(Path(__file__).resolve().parents[1] / "models" / "tiny-backgrounds")
    with pytest.raises(ValueError, match="'through-vae' needs vae_model"):
        OracleClient(policy="through-vae")
    drawn, through = OracleClient(), OracleClient(policy="through-vae", vae_model=model)
    for client in (drawn, through):
        client.submit(_job(split, {"mode": "aig"}))
    plain, round_trip = np.stack(_images(drawn)), np.stack(_images(through))
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    assert np.array_equal(round_trip, reconstruct(vae, plain))
    change = np.abs(round_trip.astype(int) - plain.astype(int)).mean()
    assert 1 < change < 40  # changed, yet the same scenes


def test_results_are_paged_by_cursor(split) -> None:
    client = OracleClient()
    client.submit(_job(split, {"mode": "aig"}))
    first = client.results("oracle-test", after="0-0", limit=3)
    rest = client.results("oracle-test", after=first.next, limit=10)
    assert [i.index for i in first.items + rest.items] == [0, 1, 2, 3]
    assert client.results("oracle-test", after=rest.next).items == []
    with pytest.raises(ValueError, match="unknown oracle policy"):
        OracleClient(policy="perfect")


def test_a_fixed_epoch_size_gives_every_arm_the_same_steps() -> None:
    """train.epoch_images: the same number of keys an epoch however many generated images joined."""
    from types import SimpleNamespace

    from actgen_trainer.data import EpochSampler

    def keys(generated: int, size: int | None) -> list:
        records = [SimpleNamespace(file=f"{i}.png", class_id=0) for i in range(generated)]
        sampler = EpochSampler(SimpleNamespace(records=records), lambda e: 7 + e, size=size)  # type: ignore[arg-type]
        sampler.set_epoch(0, np.arange(100))
        return list(sampler)

    assert len(keys(0, None)) == 100 and len(keys(30, None)) == 130  # the set, as before
    fixed = [keys(n, 64) for n in (0, 30)] + [keys(0, 250)]
    assert [len(k) for k in fixed] == [64, 64, 250]
    assert len({k.real for k in fixed[2] if k.real is not None}) == 100  # cycled: every image drawn


# The short version of `make ablation-oracle` in the suite: 4 epochs, jobs after epochs 0 and 1.
MINI = ["train.epochs=4", "generation.images_per_epoch=4", "data.test_subset=100"]


@pytest.mark.slow
def test_miniature_oracle_grid_runs_the_real_loop(tmp_path: Path) -> None:
    out = tmp_path / "oracle"
    arms = ["real", "oracle-guides", "oracle-aig", "oracle-aig+adversarial", "oracle-aig-through-vae"]
    run = ablation.run_ablation(
        testbed="backgrounds", arms=arms, seeds=1, out=out, overrides=MINI, progress=False, log=lambda _: None
    )
    assert run.ran == [(a, 0) for a in arms]
    results = json.loads((out / "results.json").read_text())
    cells = {c["arm"]: c for c in results["cells"]}
    assert results["reference"]["test_images"] == 7180
    assert cells["real"]["images_generated"] == 0
    for arm in arms[1:]:
        cell = cells[arm]
        assert cell["images_generated"] == 8 and cell["images_asked"] == 8
        extra = cell["extra"]
        assert 0 <= extra["worst_group_accuracy"] <= cell["test_acc"] <= 1
        assert extra["mask_iou"] is None  # no diffusion, no eq. 8
    assert cells["oracle-guides"]["extra"]["distance_to_guide"] == 0.0
    aig = cells["oracle-aig"]["extra"]
    assert aig["change_outside"] > 3 * aig["change_inside"]  # the background changed, not the digit
    assert cells["oracle-aig"]["faithfulness"] is not None
    # through the generator's VAE: the same draws, the digit no longer exact (the autoencoder's loss)
    through = cells["oracle-aig-through-vae"]["extra"]
    assert through["change_inside"] > 2 * aig["change_inside"]
    assert cells["oracle-aig-through-vae"]["fingerprint"] != cells["oracle-aig"]["fingerprint"]
    # the generated images joined the training set (its size), not the epoch's draws (EpochSampler)
    sizes = {
        arm: [json.loads(line)["train_size"] for line in (out / c["run_dir"] / "metrics.jsonl").open()]
        for arm, c in cells.items()
    }
    assert sizes["oracle-aig"][-1] == sizes["real"][-1] + 8
    table = (out / "table.md").read_text()
    assert "| oracle-aig |" in table


@pytest.mark.slow
def test_an_oracle_cell_on_the_shift_copies_the_guides_its_trainer_mined(tmp_path: Path) -> None:
    """backgrounds-shift's slice differs from v3's in every image, so the oracle and the diagnostics
    must load the cell's data set: each guide the trainer sent comes back unchanged (oracle-guides),
    and the test split is the one group of the shift."""
    from PIL import Image

    out = tmp_path / "shift"
    ablation.run_ablation(
        testbed="backgrounds",
        arms=["oracle-guides"],
        seeds=1,
        out=out,
        overrides=[*MINI, "data.dataset=backgrounds-shift"],
        progress=False,
        log=lambda _: None,
    )
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    extra = cell["extra"]
    assert extra["worst_group_accuracy"] == extra["group/minority/hard"] == cell["test_acc"]
    assert np.isnan(extra["group/majority/common"])  # no such image in the shift's test split
    assert cell["examples"] and extra["distance_to_guide"] == 0.0
    for pair in cell["examples"]:
        guide, generated = (
            np.asarray(Image.open(out / pair[k]).convert("RGB")) for k in ("guide", "generated")
        )
        assert np.array_equal(guide, generated)
