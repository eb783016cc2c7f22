"""Kill and resume: nothing lost, nothing folded twice, and with --sync the same generated set.

A real generator process (tiny model) on a real Redis; the non-blocking case kills a real
trainer subprocess with SIGKILL and resumes it through the CLI.
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

import torch
from trainer_helpers import client_fixture, generator_fixture, small_config  # noqa: F401 (fixtures)

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_trainer.checkpoint import load_checkpoint
from actgen_trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def _content(trainer: Trainer) -> list[tuple]:
    """The generated set without stream/job ids (which differ between two runs)."""
    return [
        (r.epoch, r.index, r.class_id, r.guide_id, r.sha256, r.folded_before_epoch)
        for r in trainer.generated.records
    ]


def test_sync_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path, client: GeneratorClient) -> None:
    whole = Trainer(small_config(tmp_path / "a", "generation.sync=true"), client=client, progress=False)
    whole.run()

    first = Trainer(
        small_config(tmp_path / "b", "generation.sync=true"),
        client=client,
        progress=False,
        stop_after_epoch=0,
    )
    first.run()
    assert first.state.epoch == 1 and len(first.generated) == 0
    resumed = Trainer(
        small_config(tmp_path / "b", "generation.sync=true"), client=client, progress=False, resume=True
    )
    assert resumed.state.run_id == first.state.run_id and resumed.state.epoch == 1
    resumed.run()

    assert len(whole.generated) == 4
    assert _content(resumed) == _content(whole)
    assert [r["test_acc"] for r in resumed.state.metrics] == [r["test_acc"] for r in whole.state.metrics]
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # the resumed run re-posted nothing it had posted: one job per epoch of the first half
    assert [j["epoch"] for j in resumed.state.jobs] == [0, 1]


def _stream_ids_up_to(client: GeneratorClient, run_id: str, cursor: str) -> list[str]:
    def key(stream_id: str) -> tuple[int, int]:
        ms, _, seq = stream_id.partition("-")
        return int(ms), int(seq)

    ids, after = [], "0-0"
    while True:
        page = client.results(run_id, after=after, limit=100)
        ids += [item.id for item in page.items if key(item.id) <= key(cursor)]
        after = page.next
        if len(page.items) < 100:
            return ids


def test_non_blocking_kill_and_resume_folds_every_item_exactly_once(
    tmp_path: Path, client: GeneratorClient, generator: GeneratorProcess
) -> None:
    cfg = small_config(tmp_path)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    command = [
        sys.executable,
        "-m",
        "actgen_trainer.cli",
        "train",
        "--config",
        str(config_file),
        "--generator-url",
        generator.url,
        "--no-progress",
    ]
    run_dir = cfg.run_dir
    log = open(tmp_path / "trainer.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "checkpoint.pt").exists():  # epoch 0 is checkpointed
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        # kill at once, inside epoch 1 (or a later one, never past the last): a fixed sleep here
        # raced the trainer, which on a quiet machine finished all its epochs within it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed_at = load_checkpoint(run_dir, cfg.run_name)["epoch"]
    assert 1 <= killed_at < cfg.train.epochs

    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "images generated" in done.stdout

    final = load_checkpoint(run_dir, cfg.run_name)
    assert final["epoch"] == cfg.train.epochs
    records = [json.loads(line) for line in (run_dir / "generated" / "index.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an item was folded twice"
    assert [r["id"] for r in final["generated"]] == ids
    # exactly the finished items up to the final cursor: none lost, none twice
    assert sorted(ids) == sorted(_stream_ids_up_to(client, final["run_id"], final["cursor"]))
    assert len(ids) >= 2  # at least the first job arrived during the run
    for r in records:
        data = (run_dir / "generated" / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
    # one job per epoch of the first half, though the killed session may have posted one twice
    jobs = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    assert [j["epoch"] for j in jobs] == [0, 1]
    assert len({j["job_id"] for j in jobs}) == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(cfg.train.epochs))
    assert sum(m["folded"] for m in metrics) == len(ids)
    assert os.path.exists(run_dir / "report.html")
