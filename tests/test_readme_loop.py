"""README.md's own-loop code block, as it stands (issue 28): taken out of the README, completed with a
small loop of this test's own (scikit-learn's digits, a small CNN), and run against a real replica
started as `make serve` starts it (no model named: the shipped trained digits model), once with
normalised and once with [0, 1] tensors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from service_helpers import key_prefix_for

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny-digits"


def readme_loop() -> str:
    """The first python block of the README's "From your own training loop" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## From your own training loop", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README.md's own-loop section has no python block"
    return found.group(1)


@pytest.fixture(scope="module")
def digits_replica(redis_url: str) -> Iterator[GeneratorProcess]:
    """A replica as `make serve` starts it: no model named, so the shipped trained digits model."""
    with key_prefix_for(redis_url) as prefix:
        proc = GeneratorProcess(
            redis_url=redis_url, model="", env={"ACTGEN_KEY_PREFIX": prefix, "OMP_NUM_THREADS": "1"}
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("ACTGEN_MODEL", raising=False)
            proc.start()
        try:
            yield proc
        finally:
            proc.stop()


def _completion(normalised: bool) -> dict[str, Any]:
    """What the snippet leaves to the reader: data, model, transform, one training epoch."""
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from actgen_shared.architectures import build_classifier
    from actgen_shared.digits import load_digits_split
    from actgen_shared.labels import DIGITS

    torch.manual_seed(0)
    size = 16
    digits = load_digits_split(size)
    x = torch.from_numpy(digits.train_images).permute(0, 3, 1, 2).float() / 255  # [0, 1]
    y = torch.from_numpy(digits.train_labels)
    mean, std = ((0.5,) * 3, (0.5,) * 3) if normalised else ((0.0,) * 3, (1.0,) * 3)
    x = (x - mean[0]) / std[0]

    def train_tf(image: Any) -> torch.Tensor:  # a generated PIL image, as the real ones come
        import numpy as np

        unit = torch.from_numpy(np.array(image.resize((size, size)))).permute(2, 0, 1).float() / 255
        return (unit - mean[0]) / std[0]

    model = build_classifier("simple_cnn", len(DIGITS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sizes: list[int] = []

    def train_one_epoch(net: torch.nn.Module, dataset: Any) -> None:
        sizes.append(len(dataset))
        net.train()
        for images, labels in DataLoader(dataset, batch_size=50, shuffle=True):
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return {
        "torch": torch,
        "ARCH": "simple_cnn",
        "SIZE": size,
        "MEAN": mean,
        "STD": std,
        "CLASSES": DIGITS,
        "epochs": 4,
        "train_tf": train_tf,
        "model": model,
        "real": TensorDataset(x[:150], y[:150]),
        "held_x": x[150:152],  # two held-out images: a few guides per epoch keep the CPU test short
        "held_y": y[150:152],
        "train_one_epoch": train_one_epoch,
        "sizes": sizes,
    }


@pytest.mark.parametrize("normalised", [True, False], ids=["normalised", "unit"])
def test_the_readme_loop_runs_as_written(
    digits_replica: GeneratorProcess,
    normalised: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ACTGEN_GENERATOR_URL", digits_replica.url)
    monkeypatch.delenv("ACTGEN_API_KEY", raising=False)
    caplog.set_level(logging.INFO)
    scope = _completion(normalised)
    exec(compile(readme_loop(), "README.md", "exec"), scope)  # the block, as it stands
    run = scope["run"]
    posted = sum(row["posted"] for row in run.history)
    arrived = sum(row["arrived"] for row in run.history)
    assert posted > 0 and arrived == posted  # drained before the second half
    sizes = scope["sizes"]
    assert sizes[0] == 150 and sizes[-1] == 150 + arrived  # the generated images were trained on
    jobs = run.ledger.jobs
    assert [j["epoch"] for j in jobs] == [0, 1]
    assert jobs[0]["classifier_ref"] is None and jobs[1]["classifier_ref"] is not None  # the ramp
    with GeneratorClient(digits_replica.url) as plain:
        state = plain.status(jobs[1]["job_id"])
        assert state.result is not None and state.result.options.adv_prob == 0.125  # 0.5 * 1 / 4
        assert Path(plain.info().model).resolve() == MODEL.resolve()  # the one `make serve` serves
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("actgen")]
    assert (
        len([r for r in caplog.records if re.match(r"epoch \d: posted \d+, arrived \d+", r.getMessage())])
        == 4
    )
