"""DDP for real: torchrun with 2 gloo processes on the CPU, a real generator replica, kill -9, --resume.

Both ranks post their own hard samples, rank 0 alone uploads the classifier, and each rank folds
the results stream into a folder of its own: the two folders must hold the same images in the
same order (no shared filesystem needed), and after a SIGKILL mid-run and ``--resume`` every
finished item is folded exactly once on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer_helpers import client_fixture, generator_fixture, small_config  # noqa: F401 (fixtures)

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import free_port
from actgen_trainer.checkpoint import load_checkpoint
from actgen_trainer.distributed import rank_seed
from actgen_trainer.link import _stream_key
from actgen_trainer.loop import Trainer

WORLD = 2
PER_EPOCH = 3  # generation.images_per_epoch: the whole run's, split 2 + 1 over the ranks


def _torchrun(config_file: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "actgen_trainer.cli",
        "train",
        "--config",
        str(config_file),
        "--generator-url",
        url,
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _index(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines() if line]


def _stream_ids_up_to(client: GeneratorClient, run_id: str, cursor: str) -> list[str]:
    ids, after = [], "0-0"
    while True:
        page = client.results(run_id, after=after, limit=100)
        ids += [item.id for item in page.items if _stream_key(item.id) <= _stream_key(cursor)]
        after = page.next
        if len(page.items) < 100:
            return ids


def test_rank_seeds_differ_and_rank_zero_keeps_the_run_seed() -> None:
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8


def test_two_gloo_ranks_fold_the_same_set_and_survive_kill_and_resume(
    tmp_path: Path, client: GeneratorClient, generator: GeneratorProcess
) -> None:
    # 101 test images in batches of 25: the ranks' shards (51, 50) take 3 and 2 batches; 3 images
    # per epoch for the whole run: rank 0 posts 2, rank 1 posts 1
    cfg = small_config(
        tmp_path,
        "data.test_subset=101",
        "train.eval_batch_size=25",
        f"generation.images_per_epoch={PER_EPOCH}",
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    run_dir = cfg.run_dir
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _torchrun(config_file, generator.url),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "checkpoint.pt").exists():  # epoch 0 done and checkpointed
                break
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()[-4000:]
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, as a lost machine would
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = load_checkpoint(run_dir, cfg.run_name)["epoch"]
    assert 1 <= killed_at < cfg.train.epochs

    done = subprocess.run(
        _torchrun(config_file, generator.url, "--resume"),
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert done.stdout.count("images generated") == 1  # rank 0 alone reports

    final = load_checkpoint(run_dir, cfg.run_name)
    assert final["epoch"] == cfg.train.epochs
    assert len(final["rng_ranks"]) == WORLD
    assert not torch_equal_rng(final["rng_ranks"][0], final["rng_ranks"][1])
    zero, one = _index(run_dir / "generated"), _index(run_dir / "generated-rank1")
    ids = [r["id"] for r in zero]
    assert len(ids) == len(set(ids)), "an item was folded twice"
    # both ranks trained on the same generated images, folded in the same order and epoch
    assert [(r["id"], r["sha256"], r["folded_before_epoch"]) for r in one] == [
        (r["id"], r["sha256"], r["folded_before_epoch"]) for r in zero
    ]
    for folder, records in ((run_dir / "generated", zero), (run_dir / "generated-rank1", one)):
        for r in records:
            assert hashlib.sha256((folder / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    # none lost, none twice: exactly the finished items up to the final cursor
    assert sorted(ids) == sorted(_stream_ids_up_to(client, final["run_id"], final["cursor"]))
    # each rank posted its own share of the run's images each generation epoch: 2 and 1
    jobs = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    assert sorted((j["epoch"], j["rank"], j["items"]) for j in jobs) == [
        (0, 0, 2),
        (0, 1, 1),
        (1, 0, 2),
        (1, 1, 1),
    ]
    assert len({j["job_id"] for j in jobs}) == 4
    assert len(ids) == 2 * PER_EPOCH, "the final wait at mid-training takes in every image asked for"
    # one classifier per epoch, uploaded by rank 0 and shared (epoch 0 has adv_prob 0: none)
    refs = {e: {j["classifier_ref"] for j in jobs if j["epoch"] == e} for e in (0, 1)}
    assert refs[0] == {None} and len(refs[1]) == 1 and None not in refs[1]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(cfg.train.epochs))
    assert sum(m["folded"] for m in metrics) == len(ids)
    assert [m["posted"] for m in metrics[:2]] == [PER_EPOCH, PER_EPOCH]
    # test accuracy over the whole test set (101 images, sharded and summed): a multiple of 1/101
    assert all(abs(m["test_acc"] * 101 - round(m["test_acc"] * 101)) < 1e-6 for m in metrics)
    assert (run_dir / "report.html").exists()
    # one process with the same config asks for and gets as many images: the count is the run's
    one = Trainer(cfg.model_copy(update={"output_dir": str(tmp_path / "one")}), client=client, progress=False)
    assert one.run().images_generated == len(ids) == 2 * PER_EPOCH


def torch_equal_rng(a: dict, b: dict) -> bool:
    import torch

    return bool(torch.equal(a["torch"], b["torch"]))
