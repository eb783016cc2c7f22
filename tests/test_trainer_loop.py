"""Algorithm 1 end to end: a real generator process (tiny model) on a real Redis.

One sync run is enough to check the loop's contract: jobs only in the first half, the
validation slice merged back at mid-training, and every generated image in the training set
at the dataset's resolution with its guide's class.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from trainer_helpers import EPOCHS, client_fixture, generator_fixture, small_config  # noqa: F401 (fixtures)

from actgen_shared.client import GeneratorClient
from actgen_trainer.data import GeneratedSet, training_set
from actgen_trainer.loop import Trainer


def test_sync_run_posts_first_half_merges_slice_and_folds_labelled_images(
    tmp_path: Path, client: GeneratorClient
) -> None:
    cfg = small_config(tmp_path, "generation.sync=true", "generation.prompt=a picture of {}")
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    rows = trainer.state.metrics
    n_train, n_val = len(trainer.split.train), len(trainer.split.val)
    assert (n_train, n_val) == (150, 50)

    # jobs after epochs 0 and 1 only (the first half), one per epoch, with adv_prob 0.5*e/E
    assert [r["posted"] for r in rows] == [2, 2, 0, 0]
    assert [j["epoch"] for j in trainer.state.jobs] == [0, 1]
    assert trainer.state.classifiers == []  # uploaded for epoch 1's job, deleted when the run ended
    assert client.memory_bank(trainer.state.run_id).counts == {}  # the run's bank went with it
    for job in trainer.state.jobs:
        state = client.status(job["job_id"])
        assert state.status.value == "done" and state.run_id == trainer.state.run_id
        assert state.result is not None
        assert state.result.options.adv_prob == pytest.approx(0.5 * job["epoch"] / EPOCHS)
        assert state.result.options.mode.value == "actgen"
        assert state.result.options.seed is not None
        # generation.prompt reaches every item; the demo names no preset: the model's defaults
        assert state.result.options.prompt == "a picture of {}" and state.result.options.preset is None
        assert {(r.resolved.prompt, r.resolved.defaults) for r in state.result.items} == {
            ("a picture of {}", "released")
        }

    # the validation slice trains from mid-training on; generated images train once folded
    assert [r.get("merged_validation", False) for r in rows] == [False, False, True, False]
    assert rows[0]["train_size"] == n_train
    assert rows[1]["train_size"] == n_train + 2
    assert rows[2]["train_size"] == n_train + n_val + 4
    assert rows[3]["val_acc"] is None and rows[1]["val_acc"] is not None

    # every generated image: 16 px (the generator made 64 px), labelled with its guide's class
    gen = trainer.generated
    assert len(gen) == summary.images_generated == 4
    for record in gen.records:
        guide_index = int(record.guide_id.removeprefix("train-"))
        assert guide_index in set(trainer.split.val.tolist())
        assert record.class_id == trainer.train_source.target(guide_index)
        with Image.open(gen.root / record.file) as img:
            assert img.size == (16, 16)
    dataset = training_set(trainer.train_source, trainer.split.train, gen, trainer.train_tf)
    for k, record in enumerate(gen.records):
        image, label = dataset[n_train + k]
        assert tuple(image.shape) == (3, 16, 16) and label == record.class_id

    # the report opens from disk and holds the gallery
    page = summary.report.read_text()
    assert "Guide &rarr; generated" in page and page.count("data:image/png;base64,") >= 4 + 2 * 4
    disk = GeneratedSet(gen.root, 16, trainer.classes)
    disk.reload()
    assert [r.id for r in disk.records] == [r.id for r in gen.records]


def test_real_mode_posts_nothing(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "generation.mode=real", "train.epochs=2")
    trainer = Trainer(cfg, client=None, progress=False)
    summary = trainer.run()
    assert summary.images_generated == 0 and trainer.state.jobs == []
    assert [r["posted"] for r in trainer.state.metrics] == [0, 0]
    assert [r.get("merged_validation", False) for r in trainer.state.metrics] == [False, True]


def test_non_blocking_run_waits_for_jobs_still_out_one_epoch_after_the_last_post(
    tmp_path: Path, client: GeneratorClient
) -> None:
    """Mid-training (epoch 2) trains on what has arrived; epoch 3 waits (bounded) for the rest,
    so the last job had an epoch to finish, as every job has before its images are due."""
    cfg = small_config(tmp_path)
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    rows = trainer.state.metrics
    assert cfg.generation_epochs == 2 and cfg.final_wait_epoch == 3
    assert [r["posted"] for r in rows] == [2, 2, 0, 0]
    assert rows[2].get("merged_validation") and "seconds_final_wait" not in rows[2]
    assert "seconds_final_wait" in rows[3]
    # everything asked for arrived, the last job's images by the wait at epoch 3 at the latest
    assert summary.delivery["asked"] == len(trainer.generated) == 4 and summary.delivery["never"] == 0
    last = trainer.state.jobs[-1]["job_id"]
    assert [r.folded_before_epoch <= 3 for r in trainer.generated.records if r.job_id == last] == [True] * 2
