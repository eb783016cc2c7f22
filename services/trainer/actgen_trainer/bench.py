"""Does generation stay off the training path? Total time of non-blocking training vs real-only.

    python -m actgen_trainer.bench [--repeats 3] [--epochs 6] [--out runs/bench-overlap.json]

The trainer runs the demo config (digits, a small CNN, 8 hard samples per epoch) in this process,
pinned to the first CPU core with one torch thread; Redis and the generator replicas run on the
other cores. They are *started* there (a child inherits its parent's CPU set, and so does every
thread it starts later): pinning a running replica by pid would move its main thread only.

Four arms alternate for ``--repeats`` rounds (each round in another order); every figure is the
median of its per-round ratios, each run from scratch after untimed warm-up runs:

* ``real``: real-only training, both generators idle. The baseline of every ratio.
* ``nonblocking``: the **headline**, ``total_ratio_nonblocking`` (target <= 1.02). The generator
  is a *GPU-like replica that keeps up*: ``serve --sampler echo`` with ``ACTGEN_ECHO_STEP_S``
  (the scaling bench's stand-in for a GPU-bound replica), so a job takes a fixed time (a quarter
  of an epoch here) without using a CPU. The trainer's core stays the trainer's, so the ratio
  is the trainer's own cost of non-blocking generation. It is split into where the extra time
  goes, as shares of real-only's total: Algorithm 1's evaluation of the validation slice
  (``eval_val``, the hard-sample pick: work the method does whatever the generator), training
  and testing on the generated images, the link to the generator (post and fold), the final
  wait for the jobs still out (``Config.final_wait_epoch``), and the rest (set-up, checkpoints,
  the report). ``stall_ratio_nonblocking`` is 1 + (link + waits) / real-only: the time the
  trainer spent on or waiting for the generator.
* ``real_busy``: real-only training while the tiny model works through a backlog of jobs like
  the trainer's on the other core: ``corun_slowdown`` = real_busy / real. On a 2-vCPU VM the
  "cores" share caches and memory bandwidth (maybe a physical core), so this is what a CPU
  generator costs the trainer even with no protocol at all. ``corun_cpu_slowdown`` is the same
  for the trainer's CPU time: that part is interference proper; wall time above it is the
  trainer's core serving something else (on a shared machine, other work squeezed off the
  generator's core).
* ``nonblocking_cpu``: ``total_ratio_nonblocking_cpu_generator``, the same non-blocking run with
  the tiny model generating on the other core (``--cpu-steps`` DDPM steps). Its excess over the
  headline should be about (corun_slowdown - 1) x the share of the run the generator was busy
  (``total_ratio_nonblocking_cpu_generator_expected``).

Then one run against an echo generator that **cannot keep up** (a job takes ``--slow-job-epochs``
epochs): its total ratio, the final wait, and the trainer's own delivery report (images
asked, on time, late, never; epochs that posted nothing because ``max_inflight`` jobs were out).
``--sync`` adds one synchronous run against it (the paper's code's behaviour).

Prints and writes the figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actgen_shared.client import GeneratorClient
from actgen_shared.codecs import png_to_b64
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.schemas import GenerationOptions, JobItem, JobRequest, JobState
from actgen_trainer.config import Config, load_config
from actgen_trainer.demo import _config_path
from actgen_trainer.link import job_options
from actgen_trainer.loop import Trainer

TARGET_RATIO = 1.02
BUSY_MIN_JOBS = 16  # the smallest backlog the real_busy arm submits
ARMS = ("real", "nonblocking", "real_busy", "nonblocking_cpu")
ECHO_STEP_S = 0.05  # the echo replica's seconds per step: a job's time is steps x this
FAST_JOB_EPOCHS = 0.25  # the generator that keeps up: a job takes a quarter of an epoch
SLOW_JOB_EPOCHS = 3.0  # the one that cannot: three epochs per job
WARMUP_EPOCHS = 2
GRAD_STEPS = 2  # guidance steps of the jobs (the tiny model's cost per job)
# the parts of an epoch the loop times (metrics.jsonl's seconds_*); "fold" includes "final_wait"
PARTS = ("train", "eval", "eval_val", "post", "fold", "final_wait", "wait")
LINK_PARTS = ("post", "fold", "final_wait", "wait")  # the trainer on or waiting for the generator
MAX_STEPS: int = next(
    m.le for m in GenerationOptions.model_fields["num_inference_steps"].metadata if hasattr(m, "le")
)


# --- cores ---------------------------------------------------------------------------------
@contextmanager
def spawning_on(cores: set[int]) -> Iterator[None]:
    """Children started inside run on ``cores``, with every thread they ever start."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def process_cores(pid: int) -> set[int]:
    """The union of the CPU sets of all threads of ``pid`` (Linux /proc)."""
    out: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out |= os.sched_getaffinity(int(tid))
        except (ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
            continue
    return out


def pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` (this process: 0) onto ``cores``, not only the main one."""
    for tid in os.listdir(f"/proc/{pid or os.getpid()}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, FileNotFoundError):
            continue


# --- runs ----------------------------------------------------------------------------------
def _run(cfg: Config, client: GeneratorClient | None) -> dict[str, Any]:
    """One training run from scratch: its times (wall, this process's CPU, per part), its
    delivery report and the jobs it left."""
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    gc.collect()  # each run starts from the same heap, not the last run's garbage
    started_at, cpu0, t0 = time.time(), time.process_time(), time.perf_counter()
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    total = time.perf_counter() - t0
    rows = trainer.state.metrics
    parts = {p: sum(r.get(f"seconds_{p}", 0.0) for r in rows) for p in PARTS}
    parts["fold"] -= parts["final_wait"]  # seconds_fold counts the final wait too
    parts["other"] = total - sum(parts.values())  # set-up, checkpoints, the report
    return {
        "total_s": total,
        "cpu_s": time.process_time() - cpu0,
        "parts_s": parts,
        "link_s": sum(parts[p] for p in LINK_PARTS),
        "epoch_s": [sum(r.get(f"seconds_{p}", 0.0) for p in PARTS if p != "final_wait") for r in rows],
        "images_generated": len(trainer.generated),
        "delivery": dict(summary.delivery),
        "started_at": started_at,
        "finished_at": started_at + total,
        "job_ids": [j["job_id"] for j in trainer.state.jobs],
    }


def _drain(client: GeneratorClient, job_ids: list[str]) -> list[JobState]:
    """Wait out unfinished jobs: the next run must not queue behind them."""
    return [client.wait(job_id, timeout_s=3600) for job_id in job_ids]


def busy_fraction(states: list[JobState], start: float, end: float) -> float:
    """Share of [start, end] in which some job was running (the union of their intervals)."""
    spans = sorted(
        (max(s.started_at, start), min(s.finished_at, end))
        for s in states
        if s.started_at is not None and s.finished_at is not None
    )
    busy, reach = 0.0, start
    for a, b in spans:
        a = max(a, reach)
        if b > a:
            busy += b - a
            reach = b
    return busy / max(end - start, 1e-9)


def echo_steps(seconds: float, step_s: float = ECHO_STEP_S) -> int:
    """Echo steps for a job of about ``seconds`` (1 to the schema's maximum)."""
    return min(MAX_STEPS, max(1, round(seconds / step_s)))


def _workload(cfg: Config, n: int, images: int, tag: str) -> list[JobRequest]:
    """``n`` jobs like the trainer's first one (its options and size), for the busy arm."""
    gen = cfg.generation
    options = GenerationOptions.model_validate({**gen.options, **gen.section_options, **job_options(cfg, 0)})
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    return [
        JobRequest(
            run_id=f"bench-busy-{tag}-{k}",
            label_set=cfg.generation.label_set or "digits",
            memory_bank_key=f"bench-busy-{tag}",
            items=[
                JobItem(
                    image=png_to_b64(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), class_id=i % 10
                )
                for i in range(images)
            ],
            options=options.model_copy(update={"seed": k}),
        )
        for k in range(n)
    ]


def _busy_run(cfg: Config, client: GeneratorClient, load: list[JobRequest]) -> dict[str, Any]:
    """Real-only training while the generator works through ``load``; then the rest is cancelled."""
    job_ids = [client.submit(r).job_id for r in load]
    result = _run(cfg, None)
    states = [client.status(j) for j in job_ids]
    result["backlog_left"] = sum(1 for s in states if not s.status.is_final)  # 0: the load ran out
    for job_id, state in zip(job_ids, states, strict=True):
        if not state.status.is_final:
            client.cancel(job_id)
    _drain(client, job_ids)
    return result


# --- figures -------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(rounds: list[dict[str, dict[str, Any]]], slow: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures from the runs: per-round ratios to the round's real-only run, and medians."""
    real = [r["real"]["total_s"] for r in rounds]

    def ratios(arm: str, key: str = "total_s") -> list[float]:
        return [r[arm][key] / r["real"][key] for r in rounds]

    total = ratios("nonblocking")
    stall = [1 + r["nonblocking"]["link_s"] / t for r, t in zip(rounds, real, strict=True)]
    extra = {
        p: _median(
            [
                (r["nonblocking"]["parts_s"][p] - r["real"]["parts_s"][p]) / t
                for r, t in zip(rounds, real, strict=True)
            ]
        )
        for p in (*PARTS, "other")
    }
    cpu_gen = ratios("nonblocking_cpu")
    corun = ratios("real_busy")
    busy = [r["nonblocking_cpu"]["generator_busy_fraction"] for r in rounds]
    real_median = _median(real)
    return {
        "total_ratio_nonblocking": _median(total),
        "total_ratio_nonblocking_rounds": total,
        "target_total_ratio": TARGET_RATIO,
        "stall_ratio_nonblocking": _median(stall),
        "stall_ratio_nonblocking_rounds": stall,
        "cpu_ratio_nonblocking": _median(ratios("nonblocking", "cpu_s")),
        "nonblocking_extra_share": extra,
        "keeps_up_delivery": [r["nonblocking"]["delivery"] for r in rounds],
        "total_ratio_nonblocking_cpu_generator": _median(cpu_gen),
        "total_ratio_nonblocking_cpu_generator_rounds": cpu_gen,
        "cpu_ratio_nonblocking_cpu_generator": _median(ratios("nonblocking_cpu", "cpu_s")),
        "corun_slowdown": _median(corun),
        "corun_slowdown_rounds": corun,
        "corun_cpu_slowdown": _median(ratios("real_busy", "cpu_s")),
        "corun_backlog_left": [r["real_busy"]["backlog_left"] for r in rounds],
        "cpu_generator_busy_fraction": _median(busy),
        "total_ratio_nonblocking_cpu_generator_expected": _median(total)
        * (1 + (_median(corun) - 1) * _median(busy)),
        "keeps_up_delivery_cpu_generator": [r["nonblocking_cpu"]["delivery"] for r in rounds],
        "real_total_s": real_median,
        "slow": {
            name: {
                "total_ratio": run["total_s"] / real_median,
                "final_wait_s": run["parts_s"]["final_wait"],
                "link_s": run["link_s"],
                "delivery": run["delivery"],
                "images_generated": run["images_generated"],
            }
            for name, run in slow.items()
        },
    }


def table(r: dict[str, Any]) -> str:
    """Printable lines of a summary, the headline's choice of generator said in words."""
    s = r["setup"]
    rounds = ", ".join(f"{x:.3f}" for x in r["total_ratio_nonblocking_rounds"])
    share = r["nonblocking_extra_share"]
    lines = [
        f"stall: non-blocking training / real-only total time, median of {s['repeats']} interleaved rounds "
        f"({s['epochs']} epochs, {s['images_per_epoch']} hard samples per epoch; trainer on cores "
        f"{s['trainer_cores']}, generators on {s['generator_cores']})",
        f"  headline, a GPU-like generator that keeps up (echo replica, {s['fast_job_s']:.2f} s per job = "
        f"{s['fast_job_epochs']} epoch, no CPU): {r['total_ratio_nonblocking']:.3f} (rounds {rounds}); "
        f"target <= {r['target_total_ratio']}",
        "    extra time as a share of real-only: "
        f"slice evaluation (Algorithm 1's pick) {share['eval_val']:+.1%}, "
        f"training {share['train']:+.1%} and testing {share['eval']:+.1%} with the generated images, "
        f"post {share['post']:+.1%}, fold {share['fold']:+.1%}, final wait {share['final_wait']:+.1%}, "
        f"other {share['other']:+.1%}",
        f"    the trainer's stall on the generator (1 + post, fold and waits / real-only): "
        f"{r['stall_ratio_nonblocking']:.3f}; trainer CPU time ratio {r['cpu_ratio_nonblocking']:.3f} "
        "(the slice evaluation is Algorithm 1's own work, whatever the generator)",
        f"  the tiny model generating on the other core ({s['cpu_steps']} steps, {s['cpu_job_s']:.2f} s per job): "
        f"{r['total_ratio_nonblocking_cpu_generator']:.3f} (rounds "
        f"{', '.join(f'{x:.3f}' for x in r['total_ratio_nonblocking_cpu_generator_rounds'])}; "
        f"trainer CPU time {r['cpu_ratio_nonblocking_cpu_generator']:.3f})",
        f"    co-run slowdown of real-only training with that core generating: {r['corun_slowdown']:.3f} "
        f"(rounds {', '.join(f'{x:.3f}' for x in r['corun_slowdown_rounds'])}; trainer CPU time "
        f"{r['corun_cpu_slowdown']:.3f}); the generator was busy "
        f"{r['cpu_generator_busy_fraction']:.0%} of a non-blocking run, so expected "
        f"{r['total_ratio_nonblocking_cpu_generator_expected']:.3f}",
    ]
    for name, run in r["slow"].items():
        d = run["delivery"]
        lines.append(
            f"  a generator that cannot keep up (echo, {s['slow_job_s']:.1f} s per job = {s['slow_job_epochs']} "
            f"epochs), {name}: {run['total_ratio']:.3f}, of which final wait {run['final_wait_s']:.1f} s; "
            f"asked {d['asked']}, on time {d['on_time']}, late {d['late']}, never {d['never']}, "
            f"epochs skipped (max_inflight) {d['skipped_backpressure']}"
        )
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actgen_trainer.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the four arms (median)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=8, help="hard samples per epoch")
    parser.add_argument("--cpu-steps", type=int, default=10, help="DDPM steps of the tiny model's jobs")
    parser.add_argument(
        "--slow-job-epochs", type=float, default=SLOW_JOB_EPOCHS, help="a slow echo job's time, in epochs"
    )
    parser.add_argument("--sync", action="store_true", help="also one --sync run against the slow generator")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    parser.add_argument("--out", default="runs/bench-overlap.json")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))
    trainer_cores, generator_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (set(cores),) * 2
    torch.set_num_threads(1)
    base = [
        "output_dir=runs/bench",
        f"generation.images_per_epoch={args.images}",
        *args.overrides,
    ]
    path = _config_path(None)

    def config(name: str, *extra: str, steps: int | None = None, epochs: int = args.epochs) -> Config:
        """The demo config for one run; ``steps``: its jobs' denoising steps."""
        sets = [f"run_name=bench-{name}", f"train.epochs={epochs}", *extra]
        if steps is not None:
            sets += [
                f"generation.options.num_inference_steps={steps}",
                f"generation.options.grad_steps={min(GRAD_STEPS, steps)}",
            ]
        return load_config(path, base + sets)

    threads = str(len(generator_cores))
    generator_env = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    rounds: list[dict[str, dict[str, Any]]] = []
    slow: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        with spawning_on(generator_cores):  # Redis and both replicas, every thread of them
            redis_server = stack.enter_context(EmbeddedRedis())
            echo = stack.enter_context(
                GeneratorProcess(
                    redis_url=redis_server.url,
                    extra_args=["--sampler", "echo"],
                    env={
                        **generator_env,
                        "ACTGEN_KEY_PREFIX": "bench-echo:",
                        "ACTGEN_ECHO_STEP_S": str(ECHO_STEP_S),
                        "ACTGEN_MAX_BATCH": str(args.images),  # a job is one batch
                        "ACTGEN_DEVICE": "cpu",
                    },
                    log_path=Path("runs/bench/generator-echo.log"),
                )
            )
            tiny = stack.enter_context(
                GeneratorProcess(
                    redis_url=redis_server.url,
                    env={**generator_env, "ACTGEN_KEY_PREFIX": "bench-cpu:"},
                    log_path=Path("runs/bench/generator-cpu.log"),
                )
            )
        pin_process(0, trainer_cores)  # every thread of this one (OpenBLAS's included)
        children = [redis_server.process.pid if redis_server.process else None, echo.pid, tiny.pid]
        pinned = all(process_cores(pid) <= generator_cores for pid in children if pid is not None)
        echo_client = stack.enter_context(GeneratorClient(echo.url, timeout_s=120))
        cpu_client = stack.enter_context(GeneratorClient(tiny.url, timeout_s=120))

        # untimed warm-ups: imports, the dataset, first calls; they also size the generators' jobs
        print("[bench] warm-up: real-only, then non-blocking, then one tiny-model job ...", flush=True)
        warm = _run(config("warm-real", "generation.mode=real", epochs=WARMUP_EPOCHS), None)
        epoch_s = statistics.median(warm["epoch_s"])
        fast_steps = echo_steps(FAST_JOB_EPOCHS * epoch_s)
        slow_steps = echo_steps(args.slow_job_epochs * epoch_s)
        warm_nb = _run(config("warm-nonblocking", steps=fast_steps, epochs=WARMUP_EPOCHS), echo_client)
        _drain(echo_client, warm_nb["job_ids"])
        probe_job = _workload(config("warm-cpu", steps=args.cpu_steps), 1, args.images, "warm")[0]
        (probe,) = _drain(cpu_client, [cpu_client.submit(probe_job).job_id])
        cpu_job_s = (probe.finished_at or 0.0) - (probe.started_at or 0.0)
        run_s = warm["total_s"] * args.epochs / WARMUP_EPOCHS  # an estimate of one run
        # enough jobs to outlast a run four times over: the probe can be slow (the replica's first
        # job), and a run under load longer than the estimate; what is left is cancelled
        backlog = max(BUSY_MIN_JOBS, math.ceil(4 * run_s / max(cpu_job_s, 0.05)) + 4)

        for k in range(args.repeats):
            order = ARMS[k % len(ARMS) :] + ARMS[: k % len(ARMS)]
            runs: dict[str, dict[str, Any]] = {}
            for name in order:
                print(f"[bench] round {k + 1}/{args.repeats}: {name} ...", flush=True)
                if name == "real":
                    runs[name] = _run(config(name, "generation.mode=real"), None)
                elif name == "nonblocking":
                    runs[name] = _run(config(name, steps=fast_steps), echo_client)
                    _drain(echo_client, runs[name].pop("job_ids"))
                elif name == "real_busy":
                    load = _workload(config(name, steps=args.cpu_steps), backlog, args.images, f"{k}")
                    runs[name] = _busy_run(config(name, "generation.mode=real"), cpu_client, load)
                else:
                    runs[name] = run = _run(config(name, steps=args.cpu_steps), cpu_client)
                    states = _drain(cpu_client, run.pop("job_ids"))
                    run["generator_busy_fraction"] = busy_fraction(
                        states, run["started_at"], run["finished_at"]
                    )
                runs[name].pop("job_ids", None)
            rounds.append(runs)
        slow_runs = [("nonblocking", ())] + ([("sync", ("generation.sync=true",))] if args.sync else [])
        for name, extra in slow_runs:
            print(f"[bench] a generator that cannot keep up: {name} ...", flush=True)
            slow[name] = _run(config(f"slow-{name}", *extra, steps=slow_steps), echo_client)
            _drain(echo_client, slow[name].pop("job_ids"))

    summary: dict[str, Any] = {
        "setup": {
            "epochs": args.epochs,
            "images_per_epoch": args.images,
            "repeats": args.repeats,
            "epoch_s_warmup": epoch_s,
            "echo_step_s": ECHO_STEP_S,
            "fast_job_epochs": FAST_JOB_EPOCHS,
            "fast_echo_steps": fast_steps,
            "fast_job_s": fast_steps * ECHO_STEP_S,
            "slow_job_epochs": args.slow_job_epochs,
            "slow_echo_steps": slow_steps,
            "slow_job_s": slow_steps * ECHO_STEP_S,
            "cpu_steps": args.cpu_steps,
            "cpu_job_s": cpu_job_s,
            "corun_backlog_jobs": backlog,
            "trainer_cores": sorted(trainer_cores),
            "generator_cores": sorted(generator_cores),
            "generators_pinned": pinned,
        },
        **summarize(rounds, slow),
        "rounds": rounds,
        "slow_runs": slow,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rounds", "slow_runs")}, indent=2))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
