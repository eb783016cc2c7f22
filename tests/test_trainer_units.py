"""Trainer parts that need no generator: config, data, losses, schedule, checkpoint, report, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from actgen_shared.architectures import load_classifier
from actgen_shared.labels import DIGITS
from actgen_trainer import cli
from actgen_trainer.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from actgen_trainer.config import Config, ConfigError, load_config
from actgen_trainer.data import GeneratedSet, digits_images, partition
from actgen_trainer.models import Loss, build_model, classifier_payload, lr_factor
from actgen_trainer.report import write_report

REPO = Path(__file__).resolve().parents[1]


# --- config ---------------------------------------------------------------------------------
def test_every_shipped_config_loads() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert {
        "demo.yaml",
        "cifar10_resnet50.yaml",
        "cifar100_resnet50.yaml",
        "cifar10_vgg16.yaml",
        "imagenet_resnet50.yaml",
    } <= set(names)
    for name in names:
        load_config(REPO / "configs" / name)
    c10 = load_config(REPO / "configs" / "cifar10_resnet50.yaml")
    assert (c10.optim.name, c10.optim.lr, c10.optim.momentum, c10.optim.weight_decay) == (
        "sgd",
        0.1,
        0.9,
        1e-4,
    )
    assert (c10.train.batch_size, c10.train.epochs, c10.generation.images_per_epoch) == (128, 300, 64)
    assert c10.data.augment == "crop_flip" and c10.generation_epochs == 150


@pytest.mark.parametrize(
    ("epochs", "posts_until", "waits_at"), [(300, 150, 151), (6, 3, 4), (3, 1, 2), (2, 1, 1), (1, 1, None)]
)
def test_the_wait_for_jobs_still_out_comes_one_epoch_after_the_last_post(
    epochs: int, posts_until: int, waits_at: int | None
) -> None:
    """The last job gets the epoch every job gets before it is due; the last epoch at the latest."""
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"train.epochs={epochs}"])
    assert (cfg.generation_epochs, cfg.final_wait_epoch) == (posts_until, waits_at)


def test_dotted_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            "train.epochs=3",
            "optim.weight_decay=5e-4",
            "generation.sync=true",
            "generation.options.num_inference_steps=7",
            "run_name=other",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.optim.weight_decay == 5e-4 and cfg.generation.sync is True
    assert cfg.generation.options["num_inference_steps"] == 7 and cfg.run_name == "other"
    # preset and prompt have keys of their own, and go into every job's options
    gen = load_config(None, ["generation.prompt=a picture of {}"]).generation
    assert gen.section_options == {"preset": "released", "prompt": "a picture of {}"}
    assert load_config(None, ["generation.preset=null"]).generation.section_options == {}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epoch=3", "train.epoch"),
        ("model.architecture=resnet9000", "resnet9000"),
        ("generation.options.adv_prob=0.3", "generation.options.adv_prob"),
        ("generation.options.num_inferance_steps=3", "num_inferance_steps"),
        ("train.epochs", "key=value"),
        ("optim.lr=-1", "optim.lr"),
        ("generation.preset=authors", "generation.preset"),
        ("generation.options.prompt=a photo of {}", "set generation.prompt instead"),
        ("generation.prompt=a photo", "must hold exactly one"),
    ],
)
def test_bad_overrides_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_cli_reports_config_errors_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--set", "train.epochs=zero"])
    assert code == 2
    assert "train.epochs" in capsys.readouterr().err
    assert cli.main(["train", "--config", "/nonexistent.yaml"]) == 2


# --- data -----------------------------------------------------------------------------------
def test_digits_are_32px_rgb_with_names() -> None:
    train, test = digits_images(32)
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.classes == list(DIGITS)
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert train.image(0).size == (32, 32)


def test_partition_is_disjoint_and_seeded() -> None:
    a, b, c = partition(1000, 0.2, seed=1), partition(1000, 0.2, seed=1), partition(1000, 0.2, seed=2)
    assert len(a.val) == 200 and len(a.train) == 800
    assert not set(a.val) & set(a.train) and set(a.val) | set(a.train) == set(range(1000))
    assert np.array_equal(a.val, b.val) and not np.array_equal(a.val, c.val)
    assert len(partition(1000, 300, seed=0, subset=500).val) == 300


def test_generated_set_resizes_dedupes_and_restores(tmp_path: Path) -> None:
    gen = GeneratedSet(tmp_path / "gen", 32, DIGITS)
    big = np.full((64, 64, 3), 200, dtype=np.uint8)
    assert gen.add("1-0", "job", 0, 0, 3, "train-5", big, folded_before_epoch=1) is not None
    assert gen.add("1-0", "job", 0, 0, 3, "train-5", big, folded_before_epoch=1) is None
    gen.add("2-0", "job", 1, 0, 7, "train-6", big, folded_before_epoch=1)
    snapshot = gen.state()
    gen.add("3-0", "job2", 0, 1, 1, "train-7", big, folded_before_epoch=2)
    assert gen.image(2).size == (32, 32) and gen.target(1) == 7
    assert len((tmp_path / "gen" / "index.jsonl").read_text().splitlines()) == 3

    fresh = GeneratedSet(tmp_path / "gen", 32, DIGITS)
    fresh.restore(snapshot)
    assert [r.id for r in fresh.records] == ["1-0", "2-0"] and "3-0" not in fresh
    assert len((tmp_path / "gen" / "index.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="class 12"):
        fresh.add("4-0", "job", 0, 0, 12, None, big, folded_before_epoch=1)


# --- models ---------------------------------------------------------------------------------
def test_focal_and_weighted_ce_follow_their_formulas() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    targets = torch.tensor([0, 0, 1])
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    p_t = torch.softmax(logits, 1)[torch.arange(3), targets]
    focal = Loss(Config().optim.model_copy(update={"loss": "focal"}))(logits, targets)
    assert torch.allclose(focal, (0.25 * (1 - p_t) ** 2 * ce).mean())
    weighted = Loss(Config().optim.model_copy(update={"loss": "weighted_ce"}))(logits, targets)
    w = torch.tensor([1.0, 5.0, 5.0])  # samples 1 and 2 are misclassified
    assert torch.allclose(weighted, (w * ce).sum() / w.sum())


def test_cosine_with_warmup() -> None:
    # per iteration: t is the fractional epoch
    assert lr_factor(0, 10, 2) == pytest.approx(0.0)
    assert lr_factor(0.5, 10, 2) == pytest.approx(0.25)
    assert lr_factor(2, 10, 2) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 0) == pytest.approx(0.0)


def test_classifier_payload_is_safetensors_the_generator_can_load() -> None:
    cfg = Config()
    model = build_model(cfg, 10)
    weights, meta = classifier_payload(model, cfg, 10)
    rebuilt = load_classifier(meta.architecture, meta.num_classes, st_load(weights))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(rebuilt(x), model(x))


# --- checkpoint -----------------------------------------------------------------------------
def test_checkpoint_roundtrip_restores_rngs(tmp_path: Path) -> None:
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path, {"run_name": "r", "epoch": 3, "cursor": "12-0"})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    state = load_checkpoint(tmp_path, "r")
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert state["epoch"] == 3 and state["cursor"] == "12-0"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="belongs to run"):
        load_checkpoint(tmp_path, "other")


# --- report ---------------------------------------------------------------------------------
def test_report_opens_from_disk_with_embedded_plots(tmp_path: Path) -> None:
    run = tmp_path / "run"
    gen = GeneratedSet(run / "generated", 32, DIGITS)
    (run / "guides").mkdir()
    guide = np.zeros((32, 32, 3), dtype=np.uint8)
    from actgen_shared.codecs import png_encode

    (run / "guides" / "train-1.png").write_bytes(png_encode(guide))
    gen.add("1-0", "j1", 0, 0, 2, "train-1", guide + 90, folded_before_epoch=1)
    (run / "run.json").write_text(
        json.dumps(
            {
                "run_id": "r-1",
                "classes": list(DIGITS),
                "mode": "actgen",
                "epochs": 2,
                "generation_epochs": 1,
                "images_per_epoch": 1,
                "sync": False,
                "dataset": "digits",
                "architecture": "simple_cnn",
                "seed": 0,
            }
        )
    )
    row = {
        "epoch": 0,
        "test_acc": 0.5,
        "train_acc": 0.4,
        "val_acc": 0.45,
        "seconds_train": 2.0,
        "seconds_eval": 0.5,
        "seconds_fold": 0.1,
        "seconds_post": 0.2,
        "seconds_wait": 0.0,
    }
    (run / "metrics.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps({**row, "epoch": 1, "val_acc": None}) + "\n"
    )
    (run / "jobs.jsonl").write_text(
        json.dumps(
            {
                "job_id": "j1",
                "epoch": 0,
                "items": 1,
                "status": "done",
                "started_at": 10.0,
                "finished_at": 12.0,
            }
        )
        + "\n"
    )
    page = write_report(run).read_text()
    assert page.count("data:image/png;base64,") >= 6  # 4 plots + guide + generated
    assert "0.500 images/s" in page and "two" in page and 'src="http' not in page


def test_cli_names_an_unreachable_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--no-progress",
            "--generator-url",
            "http://127.0.0.1:9",
            "--set",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 2
    assert "http://127.0.0.1:9" in capsys.readouterr().err


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--no-progress",
        "--set",
        "generation.mode=real",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "data.train_subset=60",
        "--set",
        "data.val_size=10",
        "--set",
        "train.epochs=1",
        "--set",
        "data.image_size=8",
        "--set",
        "data.test_subset=20",
    ]
    assert cli.main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume"]) == 0  # already finished: rebuilds the report
    assert cli.main(["report", str(tmp_path / "demo")]) == 0


def test_job_options_run_every_row_of_table_4_and_both_schedules() -> None:
    from actgen_trainer.link import job_options

    def opts(epoch: int, *sets: str) -> dict:
        return job_options(load_config(None, ["train.epochs=30", "generation.preset=paper", *sets]), epoch)

    # paper: adv_prob = 0.5 e / E, no plain-SD items
    assert opts(0) == {"mode": "actgen", "adv_prob": 0.0}
    assert opts(12) == {"mode": "actgen", "adv_prob": pytest.approx(0.2)}
    assert opts(12, "generation.preset=null") == opts(12)  # a model's own defaults: the text's schedule
    # authors: r = max(1 - e / (0.5 E - 1), 0) / 2 plain-SD items, adv_prob = 0.5 - r (0.5 by mid-training)
    authors = "generation.adv_schedule=authors"
    assert opts(7, "generation.preset=released") == opts(7, authors)  # the released preset's schedule
    assert job_options(load_config(None, ["train.epochs=30"]), 7) == opts(7, authors)  # the default
    assert opts(7, "generation.preset=released", "generation.adv_schedule=paper") == opts(7)  # explicit wins
    assert opts(0, authors) == {"mode": "actgen", "plain_prob": 0.5, "adv_prob": 0.0}
    assert opts(7, authors) == {"mode": "actgen", "plain_prob": 0.25, "adv_prob": 0.25}
    assert opts(14, authors) == {"mode": "actgen", "plain_prob": 0.0, "adv_prob": 0.5}
    assert job_options(load_config(None, ["train.epochs=2", authors]), 0)["plain_prob"] == 0.0  # 0.5E-1 <= 0
    # constant: adv_prob 0.5 from the first job (eq. 10 on as many items as the schedules end with)
    constant = "generation.adv_schedule=constant"
    assert opts(0, constant) == opts(14, constant) == {"mode": "actgen", "adv_prob": 0.5}
    assert opts(0, constant, "generation.guidance=adversarial") == {
        "mode": "actgen",
        "adv_prob": 0.5,
        "bank_sample": 0,
    }
    # the rows: aig, contrastive only, adversarial only, both
    assert opts(12, "generation.guidance=aig") == {"mode": "aig", "adv_prob": 0.0}
    assert opts(12, "generation.guidance=contrastive") == {"mode": "actgen", "adv_prob": 0.0}
    assert opts(12, "generation.guidance=adversarial") == {
        "mode": "actgen",
        "adv_prob": pytest.approx(0.2),
        "bank_sample": 0,
    }
    assert opts(12, "generation.mode=random") == {"mode": "random", "adv_prob": 0.0}
    with pytest.raises(ConfigError, match="generation.guidance"):
        load_config(None, ["generation.guidance=gradient"])


def test_cli_takes_the_generator_url_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compose's trainer: a command override without --generator-url still finds the generator."""
    monkeypatch.setenv(cli.GENERATOR_URL_ENV, "http://127.0.0.1:9")
    code = cli.main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--no-progress",
            "--set",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 2
    assert "http://127.0.0.1:9" in capsys.readouterr().err


# --- one definition per fact ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "rank", "expected"),
    [
        ("cpu", None, "cpu"),
        ("cpu", 1, "cpu"),
        ("cuda", None, "cuda:0"),
        ("cuda:1", None, "cuda:1"),  # one process keeps the index it was given
        ("cuda", 1, "cuda:1"),
        ("cuda:0", 1, "cuda:1"),  # under torchrun every rank has its own GPU, whatever the name
    ],
)
def test_each_rank_gets_its_own_device(name: str, rank: int | None, expected: str) -> None:
    from actgen_trainer.distributed import device_for

    assert device_for(name, rank) == torch.device(expected)


def test_auto_device_is_this_ranks_gpu_or_the_cpu() -> None:
    from actgen_trainer.distributed import device_for

    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert device_for("auto", 1) == expected


def test_local_rank_only_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from actgen_trainer.distributed import local_rank

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert local_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert local_rank() == 3


def test_one_retry_rule_for_the_client_and_the_trainer() -> None:
    import httpx

    from actgen_shared.client import GeneratorError, is_retryable

    assert all(is_retryable(GeneratorError(s, "x", "y")) for s in (500, 502, 503, 504))
    assert not any(is_retryable(GeneratorError(s, "x", "y")) for s in (400, 401, 404, 409, 422))
    assert is_retryable(httpx.ConnectError("refused")) and is_retryable(httpx.ReadTimeout("slow"))
    assert not is_retryable(ValueError("a bug"))


def test_train_modes_are_real_plus_the_generators_modes() -> None:
    from actgen_shared.schemas import Mode
    from actgen_trainer.config import TrainMode

    assert TrainMode.real.generator_mode is None
    assert {m.generator_mode for m in TrainMode if m is not TrainMode.real} == set(Mode)


def test_label_sets_come_from_one_table(tmp_path: Path) -> None:
    from actgen_shared.labels import LABEL_SETS
    from actgen_shared.schemas import JobRequest

    request_names = JobRequest.model_json_schema()["properties"]["label_set"]["anyOf"][0]["enum"]
    assert sorted(request_names) == sorted(LABEL_SETS)
    for name in LABEL_SETS:
        assert (
            load_config(REPO / "configs" / "demo.yaml", [f"generation.label_set={name}"]).generation.label_set
            == name
        )
    with pytest.raises(ConfigError, match="label_set"):
        load_config(REPO / "configs" / "demo.yaml", ["generation.label_set=mnist"])
