"""Does generation stay off the training path? Epoch time: real-only vs non-blocking vs --sync.

    python -m actgen_trainer.bench [--epochs 4] [--steps 60] [--out runs/bench-overlap.json]

Runs the demo config three times against one deliberately slow generator (many DDPM steps, so
each job takes longer than an epoch): ``real`` (no generation), ``actgen`` non-blocking, and
``actgen --sync``. On one machine the trainer and the generator are pinned to different CPU
cores (one torch thread each) so the comparison measures waiting, not two processes fighting
for one core. Prints and writes the ratios; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis

from actgen_trainer.config import load_config
from actgen_trainer.demo import _config_path
from actgen_trainer.loop import Trainer


def _epoch_seconds(row: dict) -> float:
    return (row["seconds_fold"] + row["seconds_train"] + row["seconds_eval"]
            + row.get("seconds_eval_val", 0.0) + row["seconds_post"] + row["seconds_wait"])


def _run(cfg, client) -> dict:
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    started = time.perf_counter()
    trainer = Trainer(cfg, client=client, progress=False)
    trainer.run()
    rows = trainer.state.metrics
    gen_rows = rows[: cfg.generation_epochs]
    return {
        "total_s": time.perf_counter() - started,
        "epoch_s": [_epoch_seconds(r) for r in rows],
        "first_half_epoch_s": sum(_epoch_seconds(r) for r in gen_rows) / len(gen_rows),
        "train_s": sum(r["seconds_train"] for r in rows),
        "wait_s": sum(r["seconds_wait"] + r["seconds_fold"] + r["seconds_post"] for r in rows),
        "images_generated": len(trainer.generated),
        "job_ids": [j["job_id"] for j in trainer.state.jobs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actgen_trainer.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="DDPM steps: makes the generator slow")
    parser.add_argument("--images", type=int, default=8, help="hard samples per epoch")
    parser.add_argument("--out", default="runs/bench-overlap.json")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))
    trainer_cores, generator_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (set(cores),) * 2
    os.sched_setaffinity(0, trainer_cores)
    torch.set_num_threads(1)
    base = [f"train.epochs={args.epochs}", "output_dir=runs/bench", f"generation.images_per_epoch={args.images}",
            f"generation.options.num_inference_steps={args.steps}", "generation.options.grad_steps=2"]
    path = _config_path(None)
    results: dict[str, dict] = {}
    with EmbeddedRedis() as redis_server, GeneratorProcess(
        redis_url=redis_server.url, env={"OMP_NUM_THREADS": str(len(generator_cores))},
        log_path=Path("runs/bench/generator.log"),
    ) as gen:
        os.sched_setaffinity(gen.pid, generator_cores)
        with GeneratorClient(gen.url, timeout_s=120) as client:
            for name, extra in (("real", ["generation.mode=real"]), ("nonblocking", []),
                                ("sync", ["generation.sync=true"])):
                cfg = load_config(path, base + [f"run_name=bench-{name}", *extra])
                print(f"[bench] {name} ...", flush=True)
                results[name] = _run(cfg, client if name != "real" else None)
                # drain: the next run must not queue behind this one's unfinished jobs
                for job_id in results[name].pop("job_ids"):
                    client.wait(job_id, timeout_s=3600)
    real = results["real"]
    summary = {
        "setup": {"epochs": args.epochs, "steps": args.steps, "images_per_epoch": args.images,
                  "trainer_cores": sorted(trainer_cores), "generator_cores": sorted(generator_cores)},
        "runs": results,
        "first_half_epoch_ratio_nonblocking": results["nonblocking"]["first_half_epoch_s"] / real["first_half_epoch_s"],
        "first_half_epoch_ratio_sync": results["sync"]["first_half_epoch_s"] / real["first_half_epoch_s"],
        "total_ratio_nonblocking": results["nonblocking"]["total_s"] / real["total_s"],
        "total_ratio_sync": results["sync"]["total_s"] / real["total_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
