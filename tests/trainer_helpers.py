"""What the trainer's end-to-end tests share: a seconds-long config and a generator to post to."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import key_prefix_for

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_trainer.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


def small_config(tmp_path: Path, *overrides: str) -> Config:
    """The demo config shrunk to seconds: 150 train digits at 16 px, 50 in the slice, 2 DDPM steps."""
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"output_dir={tmp_path}",
            "run_name=t",
            f"train.epochs={EPOCHS}",
            "data.train_subset=200",
            "data.val_size=50",
            "data.test_subset=100",
            "data.image_size=16",
            "train.batch_size=50",
            "generation.images_per_epoch=2",
            "generation.options.num_inference_steps=2",
            "generation.options.grad_steps=1",
            "generation.options.output_size=null",
            "generation.options.bank_sample=16",
            *overrides,
        ],
    )


@pytest.fixture(scope="module", name="generator")
def generator_fixture(redis_url: str) -> Iterator[GeneratorProcess]:
    """One generator replica (random-weight tiny model) for a test module, keys cleaned after."""
    with (
        key_prefix_for(redis_url) as prefix,
        GeneratorProcess(redis_url=redis_url, env={"ACTGEN_KEY_PREFIX": prefix}) as proc,
    ):
        yield proc


@pytest.fixture(name="client")
def client_fixture(generator: GeneratorProcess) -> Iterator[GeneratorClient]:
    with GeneratorClient(generator.url, timeout_s=60) as c:
        yield c
