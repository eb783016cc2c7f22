"""The trainer's device path, on the CPU: ``train.amp`` (bf16 and fp16 autocast run on the CPU too),
loaders built once (persistent workers that still see the generated images folded between epochs),
and a training step that reads nothing back to the host.

channels_last and auto's bfloat16 apply on CUDA only: ``make gpu-check`` runs them on a GPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import small_config

from actgen_shared.architectures import build_classifier
from actgen_trainer.config import ConfigError
from actgen_trainer.loop import Trainer
from actgen_trainer.precision import Compute, is_conv_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _real(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(small_config(tmp_path, "generation.mode=real", *overrides), client=None, progress=False)


def test_amp_reads_the_older_switch_and_names_an_unknown_value(tmp_path: Path) -> None:
    assert small_config(tmp_path).train.amp == "auto"  # the default
    assert small_config(tmp_path, "train.amp=true").train.amp == "auto"
    assert small_config(tmp_path, "train.amp=off").train.amp == "off"  # YAML's off is false
    assert small_config(tmp_path, "train.amp=bf16").train.amp == "bf16"
    with pytest.raises(ConfigError, match="train.amp"):
        small_config(tmp_path, "train.amp=fp8")


def test_auto_is_float32_on_the_cpu_and_channels_last_is_for_conv_nets_on_cuda() -> None:
    cnn = build_classifier("simple_cnn", 10)
    cpu = Compute.for_model(cnn, torch.device("cpu"), "auto")
    assert cpu.amp_dtype is None and cpu.memory_format == torch.contiguous_format
    assert not cpu.grad_scaler().is_enabled()
    assert Compute.for_model(cnn, torch.device("cpu"), "fp16").scaled
    # what decides channels_last on CUDA: convolutions hold most of the parameters
    assert is_conv_net(cnn) and is_conv_net(build_classifier("cifar_resnet18", 10))
    assert not is_conv_net(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 400)))


@pytest.mark.parametrize(
    ("amp", "dtype", "scaled"), [("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)]
)
def test_an_amp_epoch_on_the_cpu_trains_under_autocast(
    tmp_path: Path, amp: str, dtype: torch.dtype, scaled: bool
) -> None:
    trainer = _real(
        tmp_path,
        f"train.amp={amp}",
        "train.epochs=2",
        "data.train_subset=100",
        "data.val_size=20",
        "data.test_subset=40",
    )
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes: list[torch.dtype] = []
    first_conv.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    assert set(dtypes) == {dtype}  # training and evaluation forwards both autocast
    assert trainer.scaler.is_enabled() is scaled
    rows = trainer.state.metrics
    assert all(np.isfinite(r["train_loss"]) for r in rows) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    after = trainer.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("weight"))  # it learnt
    # the parameters stay float32 (autocast casts per op); fp16's loss scale is checkpointed
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    saved = torch.load(trainer.run_dir / "checkpoint.pt", weights_only=True)
    assert ("scale" in saved["scaler"]) is scaled


def _add_generated(trainer: Trainer, count: int, class_id: int, tag: str) -> None:
    rng = np.random.default_rng(count)
    for k in range(count):
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        trainer.generated.add(f"{tag}-{k}", f"job-{tag}", k, 0, class_id, None, image, folded_before_epoch=1)


def test_loaders_are_built_once_and_their_workers_load_images_generated_since(tmp_path: Path) -> None:
    """Persistent workers hold a copy of the dataset made at their start: what joins later must still
    reach them (SampleKey names the file), and every generated image trains in the next epoch."""
    trainer = _real(tmp_path, "data.num_workers=2", "train.epochs=3")
    seen: list[list[int]] = []
    loss_fn = trainer.loss_fn

    def recording_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen[-1].extend(targets.tolist())
        return loss_fn(logits, targets)

    trainer.loss_fn = recording_loss  # type: ignore[assignment]
    loader, workers = trainer.train_loader, None
    for epoch, added in enumerate((0, 7, 5)):
        if added:  # folded between epochs, after the workers started
            _add_generated(trainer, added, class_id=3, tag=f"e{epoch}")
        seen.append([])
        row = trainer._epoch(epoch)
        assert trainer.train_loader is loader
        pids = [w.pid for w in loader._iterator._workers]  # type: ignore[union-attr]
        assert workers is None or pids == workers  # the same worker processes every epoch
        workers = pids
        # the validation slice merges at mid-training (epoch 1 of 3), generated images as they come
        real = np.concatenate([trainer.split.train, trainer.split.val if epoch >= 1 else []])
        expected = np.bincount([trainer.train_source.target(int(i)) for i in real], minlength=10)
        expected[3] += len(trainer.generated)
        assert row["train_size"] == len(seen[-1]) == int(expected.sum())
        assert np.bincount(seen[-1], minlength=10).tolist() == expected.tolist()
    assert len(trainer.generated) == 12
    assert all(os.path.exists(f"/proc/{pid}") for pid in workers or [])


def test_a_training_step_reads_nothing_back_to_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss and accuracy are summed on the device and read once an epoch, not once a step."""
    trainer = _real(tmp_path, "train.batch_size=16")
    loop_file = sys.modules[Trainer.__module__].__file__
    reads: list[str] = []

    def counting(name: str) -> Callable[..., object]:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            if sys._getframe(1).f_code.co_filename == loop_file:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    _, _, size = trainer._train_epoch(0, trainer.split.train)
    assert size == 150  # 10 steps of 16 images
    assert len(reads) <= 2, reads  # the epoch's loss sum and correct count
