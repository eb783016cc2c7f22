"""``make bench``: what guidance and batching cost, what the service adds, how it scales.

Sections (``--only a,b`` or ``BENCH_ARGS="--only a,b"`` picks some; each is merged into
``bench/results.json`` as soon as it finishes, with its target and the machine):

* ``tiny`` (results key ``sampler_cpu``, issue 3): seconds per image for ``random`` and ``actgen``
  at batch 1 and 8 on the tiny model, 40 steps (actgen: grad_steps 10, memory bank filled,
  adv_prob 0.5, a ``simple_cnn`` classifier), ``guidance_overhead_ratio`` (batch 8),
  ``batch_speedup``, peak RSS; the ratio with ``update_uncond=false`` and the guided step's split. Target ratio <= 1.3.
* ``sd21cpu`` (``sd21_cpu``): SD 2.1's architecture (random weights, built locally) at 128 px on
  the CPU, per variant (released ``full``, ``tiny`` decoder, ``cond`` rows, ``fast``), under the
  protocol of bench/sd21.py (warm-up per cell, interleaved rotated rounds, medians). Target ratio <= 1.2.
* ``sd21gpu`` (``sd21_gpu``): the same at 512 px, fp16, batch 8 and 1, adv_prob 0.5, in a fresh
  process (``python -m bench.sd21 gpu``), when CUDA is there: the protocol of bench/sd21.py.
* ``service`` (bench/service.py): a tiny-model job through REST + Redis + worker / in-process.
* ``overlap`` (bench/overlap.py): a multi-batch job through two replicas, the encode stage off and
  on (``ACTGEN_OVERLAP_ENCODE``): what overlapping a batch's encode and store with the next saves.
* ``noop`` (bench/noop.py): the service's own cost per job: latency, where it goes, jobs/s.
* ``scaling`` (bench/scaling.py): throughput of 1, 2, 4, 8 echo replicas on one Redis.
* ``stall`` (``python -m actgen_trainer.bench``): non-blocking training's total time / real-only
  against a GPU-like (echo) generator that keeps up, the same with the tiny model on the other
  core and that core's co-run slowdown, and a generator that cannot keep up.

Modes are interleaved over the repeats and each time is the fastest repeat (as ``timeit`` does:
other load only ever adds time); medians are kept beside them. A bench is not a test: nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
STEPS, GRAD_STEPS, ADV_PROB = 40, 10, 0.5
BANK_PER_CLASS = 64
BATCHES = (1, 8)

sys.path.insert(0, str(ROOT))  # `bench.service`, when the service bench is there


def guide_items(n: int, size: int) -> list[Any]:
    """n random-pixel guides of CIFAR-10 classes, seeds 0..n-1 (the benches' batch of hard samples)."""
    from actgen_generator.sampler import SampleItem
    from actgen_shared.labels import CIFAR10

    rng = np.random.default_rng(0)
    return [
        SampleItem(
            guide=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            class_id=i % 10,
            class_name=CIFAR10[i % 10],
            seed=i,
        )
        for i in range(n)
    ]


def _options(mode: str) -> Any:
    """A run's options; ``actgen_cond`` is actgen with eq. 11 as the paper's text (``update_uncond`` off)."""
    from actgen_shared.schemas import GenerationOptions

    cond_only = mode == "actgen_cond"
    return GenerationOptions(
        mode="actgen" if cond_only else mode,
        num_inference_steps=STEPS,
        grad_steps=GRAD_STEPS,
        adv_prob=ADV_PROB,
        update_uncond=not cond_only,
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_sampler(model: Any, repeats: int) -> dict[str, Any]:
    """Seconds per image per mode and batch, interleaved over ``repeats`` rounds (medians)."""
    from actgen_generator.sampler import Classifier, GuidedSampler, with_banks
    from actgen_shared.architectures import build_classifier

    sampler = GuidedSampler(model)
    shape = (
        model.pipe.unet.config.in_channels,
        model.native_size // model.pipe.vae_scale_factor,
        model.native_size // model.pipe.vae_scale_factor,
    )
    g = torch.Generator().manual_seed(0)
    banks = {c: torch.randn(BANK_PER_CLASS, *shape, generator=g).to(model.device) for c in range(10)}
    torch.manual_seed(0)
    classifier = Classifier(build_classifier("simple_cnn", 10).eval(), 32, (0.5,) * 3, (0.5,) * 3)
    cuda = model.device.type == "cuda"
    times: dict[tuple[str, int], list[float]] = {}
    cpu_times: dict[tuple[str, int], list[float]] = {}
    peak: dict[str, float] = {}
    sampler(with_banks(guide_items(1, 64), banks), _options("actgen"), classifier=classifier)  # warm-up
    top = max(BATCHES)
    for _ in range(repeats):
        for batch in BATCHES:
            for mode in ("random", "actgen", "actgen_cond") if batch == top else ("random", "actgen"):
                items = guide_items(batch, 64)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start, cpu_start = time.perf_counter(), time.process_time()
                sampler(with_banks(items, banks), _options(mode), classifier=classifier)
                if cuda:
                    torch.cuda.synchronize()
                    peak[f"{mode}_b{batch}"] = torch.cuda.max_memory_allocated() / 2**20
                times.setdefault((mode, batch), []).append((time.perf_counter() - start) / batch)
                cpu_times.setdefault((mode, batch), []).append((time.process_time() - cpu_start) / batch)
    spi = {f"{mode}_b{batch}": min(v) for (mode, batch), v in times.items()}
    out: dict[str, Any] = {
        "model": model.model_id,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "size_px": model.native_size,
        "steps": STEPS,
        "grad_steps": GRAD_STEPS,
        "adv_prob": ADV_PROB,
        "bank_per_class": BANK_PER_CLASS,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "seconds_per_image": spi,
        "seconds_per_image_median": {f"{m}_b{b}": statistics.median(v) for (m, b), v in times.items()},
        "cpu_seconds_per_image_median": {
            f"{m}_b{b}": statistics.median(v) for (m, b), v in cpu_times.items()
        },
        "guidance_overhead_ratio": spi["actgen_b8"] / spi["random_b8"],
        "guidance_overhead_ratio_cond": spi["actgen_cond_b8"] / spi["random_b8"],
        "batch_speedup": spi["actgen_b1"] / spi["actgen_b8"],
    }
    # the guided step's parts at batch 8, and the ratio they imply for the denoising loop alone
    from bench.sd21 import guided_step_split, plain_step_seconds, step_loop_ratio

    items = with_banks(guide_items(top, 64), banks)
    out["plain_step_s"] = min(plain_step_seconds(sampler, items, _options("actgen")) for _ in range(3))
    parts = [guided_step_split(sampler, items, _options("actgen"), classifier) for _ in range(3)]
    out["guided_step_s"] = {k: min(p[k] for p in parts) for k in parts[0] if k != "guided_step"}
    out["guided_step_s"]["guided_step"] = sum(out["guided_step_s"].values())
    out["step_loop_ratio"] = step_loop_ratio(
        out["plain_step_s"], out["guided_step_s"]["guided_step"], STEPS, GRAD_STEPS
    )
    if cuda:
        out["peak_gpu_memory_mb"] = peak
        out["gpu"] = torch.cuda.get_device_name(model.device)
    else:
        out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _table(name: str, r: dict[str, Any]) -> str:
    spi = r["seconds_per_image"]
    lines = [
        f"{name}: {r['model']} on {r['device']} ({r['dtype']}, {r['size_px']} px, {r['steps']} steps, "
        f"{r['threads']} threads, best of {r['repeats']})",
        f"  {'mode':<8}{'s/img b1':>10}{'s/img b8':>10}",
    ]
    for mode in ("random", "actgen"):
        lines.append(f"  {mode:<8}{spi[f'{mode}_b1']:>10.3f}{spi[f'{mode}_b8']:>10.3f}")
    lines.append(
        f"  guidance_overhead_ratio (b8) {r['guidance_overhead_ratio']:.2f}   "
        f"batch_speedup (actgen) {r['batch_speedup']:.2f}"
    )
    if "guidance_overhead_ratio_cond" in r:
        lines.append(
            f"  with update_uncond=false (eq. 11 as the paper's text) {r['guidance_overhead_ratio_cond']:.2f}"
        )
    if "step_loop_ratio" in r:
        parts = r["guided_step_s"]
        lines.append(
            f"  guided step (b8) {parts['guided_step'] * 1e3:.1f} ms: unet forward "
            f"{parts['unet_forward'] * 1e3:.1f}, unet backward {parts['unet_backward'] * 1e3:.1f}, decode "
            f"{(parts['decode_forward'] + parts['decode_backward']) * 1e3:.1f}; plain step "
            f"{r['plain_step_s'] * 1e3:.1f} ms; the loop alone implies {r['step_loop_ratio']:.2f}"
        )
    if "peak_gpu_memory_mb" in r:
        lines.append(
            "  peak GPU MiB " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_gpu_memory_mb"].items())
        )
    else:
        lines.append(f"  peak RSS {r['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


SECTIONS = ("tiny", "sd21cpu", "sd21gpu", "service", "overlap", "noop", "scaling", "stall")


def _sections(only: str | None, skip: set[str]) -> list[str]:
    """The sections to run, in order: ``--only a,b`` or all; an unknown name is an error naming it."""
    chosen = [s.strip() for s in only.split(",") if s.strip()] if only else list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen and s not in skip]


def _sd21gpu_fresh(out: Path) -> dict[str, Any]:
    """``python -m bench.sd21 gpu`` in its own process (no kernel, shape or allocator warm from
    another section), its JSON read back; what it wrote before a failure is kept."""
    import subprocess

    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "bench.sd21", "gpu", "--out", str(out)], cwd=ROOT)
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if done.returncode != 0:
        result["error"] = f"python -m bench.sd21 gpu exited with {done.returncode}"
    return result


def _stall(repeats: int) -> dict[str, Any]:
    """``actgen_trainer.bench`` in its own process (it pins its cores), its summary read back."""
    import subprocess

    out = ROOT / "runs" / "bench-overlap.json"
    subprocess.run(
        [sys.executable, "-m", "actgen_trainer.bench", "--repeats", str(repeats), "--out", str(out)],
        check=True,
        cwd=ROOT,
    )
    summary = json.loads(out.read_text())
    return {k: v for k, v in summary.items() if k not in ("rounds", "slow_runs")}


def _stall_table(r: dict[str, Any]) -> str:
    from actgen_trainer.bench import table

    return table(r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=os.environ.get("BENCH_ONLY"),
        help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per figure")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--skip-service", action="store_true", help="do not run the service sections (service, overlap, noop)"
    )
    parser.add_argument("--skip-gpu", action="store_true", help="no GPU section even when CUDA is present")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {"service", "overlap", "noop"} if args.skip_service else set()
    if args.skip_gpu or not torch.cuda.is_available():
        skip.add("sd21gpu")
    sections = _sections(args.only, skip)

    from actgen_generator.pipeline import CACHE_ENV, load_pipeline

    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
    }
    tables = []

    def save(name: str, value: dict[str, Any]) -> None:
        """Merge one section into the results file now, so a later section's failure keeps it."""
        results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results[name] = {
            **value,
            "host": machine,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_name(args.out.name + ".tmp")
        tmp_out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_out, args.out)

    for section in sections:
        started = time.perf_counter()
        print(f"[bench] {section} ...", flush=True)
        if section == "tiny":
            with tempfile.TemporaryDirectory() as tmp:
                os.environ[CACHE_ENV] = tmp  # a fresh tiny model, reported under its own id
                tiny = load_pipeline(None, device="cpu")
                result = bench_sampler(tiny, args.repeats)
            save("sampler_cpu", result)
            tables.append(_table("sampler, CPU", result))
        elif section == "sd21cpu":
            import bench.sd21

            result = bench.sd21.run_cpu(
                rounds=max(1, args.repeats - 1), on_cell=lambda partial: save("sd21_cpu", partial)
            )
            save("sd21_cpu", result)
            tables.append(bench.sd21.table("SD 2.1 architecture, CPU", result))
        elif section == "sd21gpu":
            import bench.sd21

            result = _sd21gpu_fresh(ROOT / "runs" / "sd21gpu.json")  # a fresh process: nothing warm
            save("sd21_gpu", result)
            tables.append(bench.sd21.table(f"SD 2.1 architecture, {result.get('gpu')}, fp16", result))
        elif section == "service":
            import bench.service

            result = bench.service.run()
            save("service", result)
            tables.append(
                "service: "
                + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
            )
        elif section == "overlap":
            import bench.overlap

            result = bench.overlap.run()
            save("overlap_encode", result)
            tables.append(bench.overlap.table(result))
        elif section == "noop":
            import bench.noop

            result = bench.noop.run()
            save("noop", result)
            tables.append(bench.noop.table(result))
        elif section == "scaling":
            import bench.scaling

            result = bench.scaling.run()
            save("scaling", result)
            tables.append(bench.scaling.table(result))
        elif section == "stall":
            result = _stall(args.repeats)
            save("stall", result)
            tables.append(_stall_table(result))
        print(tables[-1], flush=True)
        print(f"[bench] {section}: {time.perf_counter() - started:.0f} s", flush=True)
    print("\n" + "\n\n".join(tables))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
