"""The whole method by default, and nothing that fails in silence (issue 28).

An ActGenRun given ``epochs=`` follows the paper's ramp of adversarial guidance and uploads its
classifier once the ramp starts; one without says so once in its log; a budget caps what is
posted; bad images are named before anything is uploaded; the arrived images batch with a
TensorDataset's and an ImageFolder's labels; the Lightning callback refuses what would leave its
images out of training. One real replica (random-weight tiny model, real Redis) serves the module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import key_prefix_for
from torch.utils.data import DataLoader, TensorDataset, default_collate

from actgen_shared.architectures import build_classifier
from actgen_shared.client import GeneratorClient
from actgen_shared.guides import GuideError
from actgen_shared.labels import DIGITS
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.run import ActGenRun

FAST = {"num_inference_steps": 2, "grad_steps": 1, "height": 64, "width": 64, "bank_sample": 16}
HALF = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def generator(redis_url: str) -> Iterator[GeneratorProcess]:
    with (
        key_prefix_for(redis_url) as prefix,
        GeneratorProcess(
            redis_url=redis_url, env={"ACTGEN_KEY_PREFIX": prefix, "OMP_NUM_THREADS": "1"}
        ) as proc,
    ):
        yield proc


@pytest.fixture
def url(generator: GeneratorProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ACTGEN_GENERATOR_URL", generator.url)
    monkeypatch.delenv("ACTGEN_API_KEY", raising=False)
    return generator.url


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_run_with_epochs_ramps_adversarial_guidance_and_uploads_its_classifier(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    model = build_classifier("simple_cnn", len(DIGITS))
    unit = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8)
    epochs = 2
    with ActGenRun(
        classes=DIGITS,
        architecture="simple_cnn",
        image_size=16,
        mean=HALF,
        std=HALF,
        options=FAST,
        seed=3,
        epochs=epochs,
        generate_fraction=1.0,
    ) as run:
        assert [run.generating(e) for e in range(3)] == [True, True, False] and run.drain_epoch is None
        subs = [run.submit((unit - 0.5) / 0.5, labels, epoch=e, model=model) for e in range(epochs)]
        run.wait()
        with GeneratorClient(url) as plain:
            states = [plain.status(sub.jobs[0][0]) for sub in subs]
        # the paper's ramp, adv_prob = 0.5 e / E, as the trainer and the callback send it
        assert [s.result.options.adv_prob for s in states if s.result] == [0.0, 0.25]
        assert [sub.adv_prob for sub in subs] == [0.0, 0.25]
        assert subs[0].classifier_ref is None and subs[1].classifier_ref is not None  # uploaded when needed
        assert states[1].result is not None and states[1].result.classifier_ref == subs[1].classifier_ref
        assert any(item.adversarial for item in states[1].result.items)
    assert _warnings(caplog, "adversarial") == []  # nothing is off: nothing to say

    caplog.clear()
    with ActGenRun(classes=DIGITS, options=FAST) as bare:  # no epochs: it says so, once
        for e in range(2):
            sub = bare.submit(unit, labels[:8], epoch=e)
            assert sub.adv_prob == 0.0 and sub.classifier_ref is None
    said = _warnings(caplog, "no epochs=")
    assert len(said) == 1 and "adv_prob 0" in said[0] and "pass epochs=" in said[0]

    caplog.clear()
    with ActGenRun(classes=DIGITS, options=FAST, epochs=4):  # epochs but nothing to send the model as
        pass
    assert (
        len(
            _warnings(caplog, "adversarial guidance (eq. 10) is off: uploading the model needs architecture=")
        )
        == 1
    )


def test_a_budget_caps_what_is_posted(url: str) -> None:
    images, labels = torch.rand(10, 3, 16, 16), torch.arange(10)
    with ActGenRun(classes=DIGITS, options={**FAST, "mode": "aig"}, images_per_epoch=3, seed=0) as run:
        sub = run.submit(images, labels, epoch=0, guide_ids=[f"g{k}" for k in range(10)])
        assert sub.posted == 3 and sub.capped == 7
        run.cancel_pending()
    # budget: 10 % of a 40-image training set over the run, spread over its 2 generating epochs
    with ActGenRun(
        classes=DIGITS, options={**FAST, "mode": "aig"}, budget=0.1, train_size=40, epochs=4
    ) as run:
        assert [run.submit(images, labels, epoch=e).posted for e in range(3)] == [2, 2, 0]
        run.cancel_pending()
    with pytest.raises(ValueError, match="budget= is a share of the training set over the run: give epochs="):
        ActGenRun(classes=DIGITS, budget=0.1)


def test_bad_images_are_named_before_anything_is_uploaded(url: str) -> None:
    model = build_classifier("simple_cnn", len(DIGITS))
    nan = torch.rand(3, 3, 16, 16)
    nan[1, 0, 2, 2] = float("nan")
    with ActGenRun(
        classes=DIGITS, architecture="simple_cnn", image_size=16, options={**FAST, "adv_prob": 0.5}
    ) as run:
        uploads: list[int] = []
        run.client.upload_classifier = lambda *a, **k: uploads.append(1)  # type: ignore[method-assign,assignment,return-value]
        with pytest.raises(GuideError, match=r"images\[1\] has 1 values that are NaN or infinite"):
            run.submit(nan, [0, 1, 2], epoch=0, model=model)
        with pytest.raises(
            GuideError, match=r"images\[0\] has values in \[.*\]: pixel values 0\.\.255 .* divide by 255"
        ):
            run.submit(torch.rand(2, 3, 16, 16) * 255, [0, 1], epoch=0, model=model)
        with pytest.raises(ValueError, match=r"labels\[1\] is 10, outside 0\.\.9"):
            run.submit(torch.rand(2, 3, 16, 16), [0, 10], epoch=0, model=model)
        assert uploads == []
    with ActGenRun(classes=DIGITS, mean=HALF, std=(0.25,) * 3, options=FAST) as run:  # a wrong std
        with pytest.raises(GuideError, match=r"after undoing the normalisation.*are mean= and std= the ones"):
            run.submit((torch.rand(2, 3, 16, 16) - 0.5) / 0.5 * 3, [0, 1], epoch=0)


def test_arrived_images_batch_with_tensor_and_int_labels(url: str, tmp_path: Path) -> None:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    with ActGenRun(classes=DIGITS, image_size=16, options={**FAST, "mode": "aig"}, seed=0) as run:
        run.submit(torch.rand(4, 3, 16, 16), [1, 2, 3, 4], epoch=0)
        run.wait()
        assert run.refresh(1) == 4
        assert run.dataset is not None
        tensors = TensorDataset(torch.rand(4, 3, 16, 16), torch.tensor([5, 6, 7, 8]))
        for k in range(10):
            folder = tmp_path / "train" / f"c{k}"
            folder.mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
        images = ImageFolder(str(tmp_path / "train"), transform=transforms.ToTensor())
        for real in (tensors, images):
            train = run.train_dataset(real)  # the generated labels served as real's are
            assert len(train) == len(real) + 4
            generated, first_real = run.dataset[0], real[0]
            for batch in ([generated, first_real], [first_real, generated]):  # either may come first
                labels = default_collate(batch)[1]
                assert labels.dtype == torch.long
                assert sorted(labels.tolist()) == sorted([int(generated[1]), int(first_real[1])])
            seen = torch.cat([y for _, y in DataLoader(train, batch_size=3, shuffle=True)])
            assert sorted(seen.tolist()) == sorted([1, 2, 3, 4] + [int(y) for _, y in real])


# --- the Lightning callback: drop-in or loud -------------------------------------------------
def test_the_callback_checks_its_arguments_when_it_is_built() -> None:
    from actgen_shared.lightning import ActGenCallback

    held = TensorDataset(torch.rand(4, 3, 16, 16), torch.arange(4))
    with pytest.raises(TypeError, match="takes no normalized=.*mean= and std="):
        ActGenCallback(held, classes=DIGITS, normalized=True)
    with pytest.raises(TypeError, match="unexpected keyword 'archtecture'"):
        ActGenCallback(held, classes=DIGITS, archtecture="simple_cnn")
    with pytest.raises(ValueError, match="images_per_epoch must be at least 1"):
        ActGenCallback(held, classes=DIGITS, images_per_epoch=0)
    with pytest.raises(ValueError, match="exactly one of classes="):
        ActGenCallback(held)


def _lightning_fit(url: str, ignore_callback: bool, loaders_to_fit: bool) -> None:
    import lightning.pytorch as pl

    from actgen_shared.lightning import ActGenCallback

    real = TensorDataset(torch.rand(20, 3, 16, 16), torch.randint(0, 10, (20,)))
    actgen = ActGenCallback(
        real, images_per_epoch=2, classes=DIGITS, architecture="simple_cnn", image_size=16, options=FAST
    )

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_classifier("simple_cnn", len(DIGITS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(real if ignore_callback else actgen.train_dataset(real), batch_size=10)

    trainer = pl.Trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[actgen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if loaders_to_fit:
        trainer.fit(Module(), train_dataloaders=DataLoader(real, batch_size=10))
    else:
        trainer.fit(Module())


def test_the_callback_stops_when_its_images_cannot_reach_training(url: str) -> None:
    with pytest.raises(ValueError, match=r"cannot add its images to DataLoaders given to fit\(\)"):
        _lightning_fit(url, ignore_callback=False, loaders_to_fit=True)
    with pytest.raises(RuntimeError, match=r"did not call actgen.train_dataset\(real_train_set\)"):
        _lightning_fit(url, ignore_callback=True, loaders_to_fit=False)
