"""Your own images and your own classifier (configs/imagefolder.yaml).

Class folders named for the prompts (a names file, ImageNet synset ids, an error for bare ids),
a validation folder of its own, any timm model as ``timm/<name>`` on both sides, started from a
local checkpoint file, and end to end: a timm ResNet-18 started from a safetensors file trains
on non-square folder images against a real generator replica, which accepts and loads its
uploads for adversarial guidance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file
from trainer_helpers import REPO, client_fixture, generator_fixture  # noqa: F401 (fixtures)

from actgen_generator.classifiers import ClassifierError, build_checked
from actgen_shared.client import GeneratorClient
from actgen_shared.labels import class_names_for, imagenet_wnids
from actgen_shared.schemas import ClassifierMeta, ClassifierRef
from actgen_trainer.config import ConfigError, load_config
from actgen_trainer.data import DataError, load_sources, split_train
from actgen_trainer.loop import Trainer
from actgen_trainer.models import build_model
from actgen_trainer.pretrained import PretrainedError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FOLDERS = ("class_0", "class_1", "class_2")  # ids, not words: the prompts need names
NAMES = ("red square", "green circle", "blue triangle")
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
SIZES = ((20, 12), (12, 20))  # (width, height): every image non-square


def _images(folder: Path, colour: tuple[int, int, int], count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        w, h = SIZES[k % 2]
        pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")


def _dataset(root: Path, folders: tuple[str, ...] = FOLDERS, train: int = 20, test: int = 4) -> Path:
    for c, (name, colour) in enumerate(zip(folders, COLOURS, strict=False)):
        _images(root / "train" / name, colour, train, seed=c)
        _images(root / "val" / name, colour, test, seed=100 + c)
    return root


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, names file): 3 classes in folders named by ids, 20 train and 4 test images each."""
    root = _dataset(tmp_path_factory.mktemp("own"))
    names = root / "names.txt"
    names.write_text("\n".join(NAMES) + "\n\n")  # a blank line is no name
    return root, names


def _data_config(root: Path, *overrides: str):
    return load_config(REPO / "configs" / "imagefolder.yaml", [f"data.root={root}", *overrides]).data


# --- class names ------------------------------------------------------------------------------
def test_class_names_file_names_the_folders_for_the_prompts(folder_data: tuple[Path, Path]) -> None:
    root, names = folder_data
    train, test = load_sources(_data_config(root, f"data.class_names={names}"))
    assert train.classes == test.classes == list(NAMES)
    assert len(train) == 60 and len(test) == 12
    assert [train.target(k) for k in (0, 20, 40)] == [0, 1, 2]  # sorted folder order
    assert train.image(0).size in SIZES  # read as it is: no squashing on the way in
    inline = load_sources(_data_config(root, "data.class_names=[a, b, c]"))[0]
    assert inline.classes == ["a", "b", "c"]


def test_bare_id_folder_names_stop_a_generating_run_and_warn_a_real_one(
    folder_data: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, _ = folder_data
    with pytest.raises(DataError, match=r"3 class names are ids.*'class 0'.*data\.class_names"):
        load_sources(_data_config(root), prompts=True)
    with caplog.at_level(logging.WARNING, logger="actgen_trainer"):
        train, _ = load_sources(_data_config(root), prompts=False)
    assert train.classes == ["class 0", "class 1", "class 2"]
    assert "data.class_names" in caplog.text
    with pytest.raises(DataError, match="data.class_names has 2 names for 3 class folders"):
        load_sources(_data_config(root, "data.class_names=[a, b]"))
    with pytest.raises(DataError, match="data.class_names: .*missing.txt is not a file"):
        load_sources(_data_config(root, f"data.class_names={root / 'missing.txt'}"))


def test_imagenet_synset_folders_are_named_from_the_bundled_table(tmp_path: Path) -> None:
    table = imagenet_wnids()
    # the bundled synset ids are ImageNet-1k's in class-index order, as timm lists them
    from timm.data import ImageNetInfo

    assert list(table) == ImageNetInfo().label_names()
    assert list(table.values()) == class_names_for("imagenet")
    assert (table["n01440764"], table["n02099601"]) == ("tench", "golden retriever")

    root = _dataset(tmp_path / "in", folders=("n01440764", "n02099601"), train=2, test=1)
    train, test = load_sources(_data_config(root))
    assert train.classes == test.classes == ["tench", "golden retriever"]
    _images(root / "train" / "n00000001", COLOURS[2], 2, seed=9)  # not an ImageNet-1k synset
    with pytest.raises(DataError, match="'n00000001'"):
        load_sources(_data_config(root))


def test_a_validation_folder_is_the_slice_and_folders_share_class_ids(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", folders=("cat", "dog", "fox"), train=6, test=2)
    for name, colour in (("cat", COLOURS[0]), ("fox", COLOURS[2])):  # no dog: allowed
        _images(root / "holdout" / name, colour, 3, seed=7)
    cfg = _data_config(root, "data.val_folder=holdout")
    train, _ = load_sources(cfg)
    split = split_train(train, cfg, seed=0)
    assert len(split.train) == 18 and list(split.val) == list(range(18, 24))
    assert [train.target(int(i)) for i in split.val] == [0, 0, 0, 2, 2, 2]  # fox is class 2 here too
    _images(root / "val" / "owl", COLOURS[1], 1, seed=8)  # a test class training never saw
    with pytest.raises(DataError, match=r"class folders the train folder lacks: \['owl'\]"):
        load_sources(cfg)


# --- timm classifiers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded timm resnet18 (1000 classes, as pretrained checkpoints come) saved as safetensors."""
    import timm

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["model.architecture=timm/not_a_model"],
            r"model.architecture: .*'not_a_model' is not a model of timm",
        ),
        (["model.architecture=timm/resnet18.a1_in1k"], "no pretrained tag"),
        (["model.architecture=simple_cnn", "model.pretrained=true"], "model.pretrained needs a timm/<name>"),
    ],
)
def test_timm_names_and_pretrained_are_checked_by_name(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(REPO / "configs" / "imagefolder.yaml", overrides)


def test_pretrained_from_a_file_keeps_its_weights_and_resizes_the_head(
    resnet18_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, state = resnet18_file
    cfg = load_config(REPO / "configs" / "imagefolder.yaml", [f"model.pretrained={path}"])
    model = build_model(cfg, 3)
    assert model.fc.out_features == 3  # type: ignore[union-attr]
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))

    torch.save({"state_dict": state}, tmp_path / "resnet18.pth")  # plain tensors: weights_only loads it
    pth = load_config(
        REPO / "configs" / "imagefolder.yaml", [f"model.pretrained={tmp_path / 'resnet18.pth'}"]
    )
    assert torch.equal(build_model(pth, 3).state_dict()["conv1.weight"], state["conv1.weight"])

    wrong = load_config(
        REPO / "configs" / "imagefolder.yaml",
        ["model.architecture=timm/resnet34", f"model.pretrained={path}"],
    )
    with pytest.raises(PretrainedError, match=r"does not fit timm/resnet34: missing \d+ \(layer1\.2"):
        build_model(wrong, 3)
    missing = load_config(
        REPO / "configs" / "imagefolder.yaml", [f"model.pretrained={tmp_path / 'no.safetensors'}"]
    )
    with pytest.raises(PretrainedError, match="no.safetensors is not a file"):
        build_model(missing, 3)


def test_pretrained_true_offline_with_nothing_cached_names_the_cache_and_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(REPO / "configs" / "imagefolder.yaml", ["model.pretrained=true"])
    with pytest.raises(PretrainedError) as caught:
        build_model(cfg, 3)
    message = str(caught.value)
    assert "model.pretrained=true" in message and "timm/resnet18.a1_in1k" in message
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path / "hub") in message and ".safetensors" in message


def test_the_generator_rebuilds_any_timm_model_and_names_what_does_not_fit() -> None:
    import timm

    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=3).eval()
    meta = ClassifierMeta(architecture="timm/resnet18", num_classes=3, input_size=16)
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    rebuilt = build_checked(weights, meta)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x))

    wrong_head = meta.model_copy(update={"num_classes": 5})
    with pytest.raises(ClassifierError, match=r"weights: .*mis-shaped 2 \(fc\.bias \(3,\) for \(5,\)"):
        build_checked(weights, wrong_head)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "conv1.weight"}
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ClassifierError, match=r"missing 1 \(conv1\.weight\); unexpected 1 \(extra\.weight\)"):
        build_checked(save(state), meta)
    for name in ("timm/not_a_model", "timm/hf-hub:timm/resnet18.a1_in1k", "resnet18"):
        with pytest.raises(ClassifierError, match="metadata.architecture: unknown architecture"):
            build_checked(weights, meta.model_copy(update={"architecture": name}))


# --- end to end -------------------------------------------------------------------------------
def test_own_images_and_a_pretrained_timm_resnet18_train_against_a_replica(
    tmp_path: Path,
    folder_data: tuple[Path, Path],
    resnet18_file: tuple[Path, dict[str, torch.Tensor]],
    client: GeneratorClient,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, names = folder_data
    weights, state = resnet18_file
    uploads: list[ClassifierRef] = []
    upload = client.upload_classifier

    def recorded(*args: object, **kwargs: object) -> ClassifierRef:
        ref = upload(*args, **kwargs)  # type: ignore[arg-type]
        uploads.append(ref)
        return ref

    monkeypatch.setattr(client, "upload_classifier", recorded)
    cfg = load_config(
        REPO / "configs" / "imagefolder.yaml",
        [
            f"output_dir={tmp_path}",
            "run_name=own",
            f"data.root={root}",
            f"data.class_names={names}",
            "data.image_size=16",
            "data.val_size=12",
            "data.num_workers=0",
            f"model.pretrained={weights}",
            "train.epochs=2",
            "train.batch_size=16",
            "train.device=cpu",
            "generation.sync=true",
            "generation.adv_schedule=authors",  # 2 epochs: adv_prob 0.5 for epoch 0's job
            "generation.selection=lowest_confidence",  # the colours are learnt at once: none wrong
            "generation.images_per_epoch=2",
            "generation.options.num_inference_steps=2",
            "generation.options.grad_steps=1",
            "generation.options.bank_sample=16",
            "generation.options.output_size=null",
            "tracking.tensorboard=false",
        ],
    )
    trainer = Trainer(cfg, client=client, progress=False)
    assert torch.equal(trainer.model.state_dict()["conv1.weight"], state["conv1.weight"])  # the file's
    summary = trainer.run()

    assert [r["posted"] for r in trainer.state.metrics] == [2, 0]
    assert not [r for r in trainer.state.metrics if r.get("post_error")]
    assert [(u.architecture, u.num_classes) for u in uploads] == [("timm/resnet18", 3)]
    [job] = trainer.state.jobs
    state_ = client.status(job["job_id"])
    assert state_.status.value == "done", state_.error  # the replica loaded the classifier and ran
    assert state_.result is not None and state_.result.options.adv_prob == pytest.approx(0.5)
    assert {item.class_name for item in state_.result.items} <= set(NAMES)  # the names file's names
    assert summary.images_generated == 2 and len(trainer.generated) == 2
