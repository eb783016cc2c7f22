"""Does generation stay off the training path? Total time of non-blocking training vs real-only.

    python -m actgen_trainer.bench [--repeats 3] [--epochs 4] [--out runs/bench-overlap.json]

The trainer and one generator replica run pinned to different CPU cores (one torch thread each,
``os.sched_setaffinity``), so the comparison measures waiting, not two processes sharing a core.

* **Keeps up**: a generator fast enough for the trainer (``--fast-steps`` DDPM steps, each job
  done within an epoch). ``real`` and ``nonblocking`` runs alternate for ``--repeats`` rounds;
  the figure is the median of the per-round ratios of total time (target <= 1.02).
* **Cannot keep up**: the same with ``--slow-steps`` (each job longer than an epoch): what the
  trainer does then, with its ``max_inflight`` backpressure: its total time ratio and its own
  delivery report (images asked, on time, late, never; epochs that posted nothing).
* ``--sync`` adds one synchronous run against the slow generator (the paper's code's behaviour).

Prints and writes the figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_trainer.config import load_config
from actgen_trainer.demo import _config_path
from actgen_trainer.loop import Trainer

TARGET_RATIO = 1.02


def _epoch_seconds(row: dict) -> float:
    return (
        row["seconds_fold"]
        + row["seconds_train"]
        + row["seconds_eval"]
        + row.get("seconds_eval_val", 0.0)
        + row["seconds_post"]
        + row["seconds_wait"]
    )


def _run(cfg: Any, client: GeneratorClient | None) -> dict[str, Any]:
    """One training run from scratch; its times, delivery report and the jobs it left."""
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    started = time.perf_counter()
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    rows = trainer.state.metrics
    return {
        "total_s": time.perf_counter() - started,
        "epoch_s": [_epoch_seconds(r) for r in rows],
        "train_s": sum(r["seconds_train"] for r in rows),
        "wait_s": sum(r["seconds_wait"] + r["seconds_fold"] + r["seconds_post"] for r in rows),
        "images_generated": len(trainer.generated),
        "delivery": dict(summary.delivery),
        "job_ids": [j["job_id"] for j in trainer.state.jobs],
    }


def _drain(client: GeneratorClient, result: dict[str, Any]) -> None:
    """Wait out a run's unfinished jobs: the next run must not queue behind them."""
    for job_id in result.pop("job_ids"):
        client.wait(job_id, timeout_s=3600)


def _pin(trainer: set[int], generator: set[int], pid: int | None) -> None:
    os.sched_setaffinity(0, trainer)
    if pid is not None:
        os.sched_setaffinity(pid, generator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actgen_trainer.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved real/non-blocking rounds (median)"
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=8, help="hard samples per epoch")
    parser.add_argument(
        "--fast-steps", type=int, default=10, help="DDPM steps of the generator that keeps up"
    )
    parser.add_argument("--slow-steps", type=int, default=60, help="DDPM steps of the one that cannot")
    parser.add_argument("--sync", action="store_true", help="also one --sync run against the slow generator")
    parser.add_argument("--out", default="runs/bench-overlap.json")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))
    trainer_cores, generator_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (set(cores),) * 2
    torch.set_num_threads(1)
    base = [
        f"train.epochs={args.epochs}",
        "output_dir=runs/bench",
        f"generation.images_per_epoch={args.images}",
        "generation.options.grad_steps=2",
    ]
    path = _config_path(None)

    def config(name: str, steps: int, *extra: str) -> Any:
        return load_config(
            path, base + [f"run_name=bench-{name}", f"generation.options.num_inference_steps={steps}", *extra]
        )

    rounds: list[dict[str, dict[str, Any]]] = []
    slow: dict[str, dict[str, Any]] = {}
    with (
        EmbeddedRedis() as redis_server,
        GeneratorProcess(
            redis_url=redis_server.url,
            env={"OMP_NUM_THREADS": str(len(generator_cores))},
            log_path=Path("runs/bench/generator.log"),
        ) as gen,
    ):
        _pin(trainer_cores, generator_cores, gen.pid)
        with GeneratorClient(gen.url, timeout_s=120) as client:
            for k in range(args.repeats):
                order = ("real", "nonblocking") if k % 2 == 0 else ("nonblocking", "real")
                runs: dict[str, dict[str, Any]] = {}
                for name in order:
                    print(
                        f"[bench] round {k + 1}/{args.repeats}: {name} (generator {args.fast_steps} steps) ...",
                        flush=True,
                    )
                    if name == "real":
                        runs[name] = _run(config(name, args.fast_steps, "generation.mode=real"), None)
                    else:
                        runs[name] = _run(config(name, args.fast_steps), client)
                    _drain(client, runs[name])
                rounds.append(runs)
            slow_runs = [("nonblocking", ())] + ([("sync", ("generation.sync=true",))] if args.sync else [])
            for name, extra in slow_runs:
                print(f"[bench] slow generator ({args.slow_steps} steps): {name} ...", flush=True)
                slow[name] = _run(config(f"slow-{name}", args.slow_steps, *extra), client)
                _drain(client, slow[name])
    ratios = [r["nonblocking"]["total_s"] / r["real"]["total_s"] for r in rounds]
    real_median = statistics.median(r["real"]["total_s"] for r in rounds)
    summary: dict[str, Any] = {
        "setup": {
            "epochs": args.epochs,
            "images_per_epoch": args.images,
            "repeats": args.repeats,
            "fast_steps": args.fast_steps,
            "slow_steps": args.slow_steps,
            "trainer_cores": sorted(trainer_cores),
            "generator_cores": sorted(generator_cores),
        },
        "total_ratio_nonblocking": statistics.median(ratios),
        "total_ratio_nonblocking_rounds": ratios,
        "target_total_ratio": TARGET_RATIO,
        "keeps_up_delivery": [r["nonblocking"]["delivery"] for r in rounds],
        "slow": {
            name: {
                "total_ratio": run["total_s"] / real_median,
                "delivery": run["delivery"],
                "images_generated": run["images_generated"],
                "wait_s": run["wait_s"],
            }
            for name, run in slow.items()
        },
        "rounds": rounds,
        "slow_runs": slow,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rounds", "slow_runs")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
