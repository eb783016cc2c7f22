"""The run's HTML report: one self-contained file that opens from disk.

It is built only from what the run folder holds (run.json, metrics.jsonl, jobs.jsonl, the
generated set's index and PNGs, the guides), so ``actgen-trainer report RUN_DIR`` can rebuild it
at any time. Plots are matplotlib PNGs embedded as base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPORT_NAME = "report.html"
GALLERY_MAX = 48


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def delivery_counts(
    jobs: list[dict[str, Any]], records: list[dict[str, Any]], metrics: Sequence[dict[str, Any]] = ()
) -> dict[str, int]:
    """Images asked for, and how they arrived: on time, late, or never.

    On time: folded in by the end of the epoch after the one that asked (first trained on by
    epoch e + 2). Late: folded in after that (the final wait included). Never: the rest (jobs
    that failed, were cancelled, or were still running when the run ended). Epochs that posted
    nothing because of backpressure are counted apart (``skipped_backpressure``).
    """
    epoch_of = {job["job_id"]: job["epoch"] for job in jobs}
    on_time = late = 0
    for r in records:
        if r["job_id"] not in epoch_of:
            continue
        if r["folded_before_epoch"] <= epoch_of[r["job_id"]] + 2:
            on_time += 1
        else:
            late += 1
    asked = sum(int(job["items"]) for job in jobs)
    return {
        "asked": asked,
        "on_time": on_time,
        "late": late,
        "never": asked - on_time - late,
        "skipped_backpressure": sum(int(m.get("skipped_backpressure") or 0) for m in metrics),
        "wait_timeouts": sum(int(m.get("wait_timeouts") or 0) for m in metrics),
    }


def _pyplot():
    """pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig) -> bytes:
    plt = _pyplot()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _accuracy_plot(metrics: list[dict[str, Any]], generation_epochs: int) -> bytes:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    epochs = [m["epoch"] for m in metrics]
    ax.plot(epochs, [m["test_acc"] for m in metrics], marker="o", label="test")
    ax.plot(epochs, [m["train_acc"] for m in metrics], marker=".", alpha=0.6, label="train")
    val = [(m["epoch"], m["val_acc"]) for m in metrics if m.get("val_acc") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), marker="x", alpha=0.6, label="validation slice")
    ax.axvline(generation_epochs - 0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(
        generation_epochs - 0.45,
        0.02,
        "slice merged",
        color="grey",
        fontsize=8,
        transform=ax.get_xaxis_transform(),
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Accuracy")
    return _figure_png(fig)


def _per_class_plot(records: list[dict[str, Any]], classes: list[str], epochs: int) -> bytes:
    plt = _pyplot()

    counts = np.zeros((max(epochs, 1), len(classes)), dtype=np.int64)
    for r in records:
        if 0 <= r["epoch"] < counts.shape[0]:
            counts[r["epoch"], r["class_id"]] += 1
    used = np.flatnonzero(counts.sum(axis=1)) if counts.any() else np.arange(1)
    counts = counts[: used.max() + 1]
    fig, ax = plt.subplots(figsize=(min(14, 1.5 + 0.45 * len(classes)), 1.2 + 0.35 * len(counts)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        for (e, c), value in np.ndenumerate(counts):
            if value:
                ax.text(c, e, str(value), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(counts)))
    ax.set_ylabel("epoch of the hard samples")
    ax.set_title("Generated images per class per epoch")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _figure_png(fig)


def _time_plot(metrics: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()

    epochs = np.array([m["epoch"] for m in metrics])
    train = np.array([m["seconds_train"] for m in metrics])
    evaluate = np.array([m["seconds_eval"] + m.get("seconds_eval_val", 0.0) for m in metrics])
    talk = np.array([m["seconds_fold"] + m["seconds_post"] for m in metrics])
    wait = np.array([m["seconds_wait"] for m in metrics])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bottom = np.zeros(len(epochs))
    for values, label in (
        (train, "training"),
        (evaluate, "evaluation"),
        (talk, "posting + folding"),
        (wait, "waiting for the generator"),
    ):
        ax.bar(epochs, values, bottom=bottom, label=label)
        bottom += values
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.set_title("Where the time went")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def _throughput(jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float | None]:
    rows, images, busy = [], 0, 0.0
    for job in jobs:
        start, end = job.get("started_at"), job.get("finished_at")
        if start and end and end > start and job.get("status") == "done":
            rows.append({**job, "seconds": end - start, "images_per_s": job["items"] / (end - start)})
            images += job["items"]
            busy += end - start
    return rows, (images / busy if busy else None)


def _throughput_plot(rows: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    ax.bar([r["epoch"] for r in rows], [r["images_per_s"] for r in rows], color="tab:purple")
    ax.set_xlabel("epoch of the job")
    ax.set_ylabel("images / s")
    ax.set_title("Generator throughput per job (started -> finished)")
    return _figure_png(fig)


def _gallery(run_dir: Path, records: list[dict[str, Any]], classes: list[str]) -> str:
    cells = []
    for r in records[:GALLERY_MAX]:
        guide = run_dir / "guides" / f"{r['guide_id']}.png"
        generated = run_dir / "generated" / r["file"]
        if not guide.exists() or not generated.exists():
            continue
        name = classes[r["class_id"]] if r["class_id"] < len(classes) else str(r["class_id"])
        cells.append(
            f'<figure><img src="{_data_uri(guide.read_bytes())}" alt="guide">'
            f'<span>&rarr;</span><img src="{_data_uri(generated.read_bytes())}" alt="generated">'
            f"<figcaption>{html.escape(name)} &middot; epoch {r['epoch']}</figcaption></figure>"
        )
    return "".join(cells) or "<p>No generated images yet.</p>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em} table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:3px 8px;font-size:.9em;text-align:right}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.gallery figure{margin:0;padding:6px;border:1px solid #ddd;border-radius:6px;text-align:center}
.gallery img{width:64px;height:64px;image-rendering:pixelated;vertical-align:middle}
.gallery span{margin:0 4px} figcaption{font-size:.75em;color:#555}
.plot{max-width:100%}
"""


def write_report(run_dir: str | Path) -> Path:
    """Build run_dir/report.html from the run folder; returns its path."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no run.json)")
    info = json.loads(info_path.read_text())
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    jobs = _read_jsonl(run_dir / "jobs.jsonl")
    records = _read_jsonl(run_dir / "generated" / "index.jsonl")
    classes = info["classes"]

    job_rows, overall = _throughput(jobs)
    delivery = delivery_counts(jobs, records, metrics)
    training = sum(m["seconds_train"] + m["seconds_eval"] + m.get("seconds_eval_val", 0.0) for m in metrics)
    talking = sum(m["seconds_fold"] + m["seconds_post"] for m in metrics)
    waiting = sum(m["seconds_wait"] for m in metrics)
    final = metrics[-1]["test_acc"] if metrics else float("nan")
    best = max((m["test_acc"] for m in metrics), default=float("nan"))

    sections = [f"<h1>ActGen run {html.escape(info['run_id'])}</h1>"]
    summary = {
        "dataset": info["dataset"],
        "architecture": info["architecture"],
        "mode": info["mode"],
        "sync": info["sync"],
        "seed": info["seed"],
        "epochs run": f"{len(metrics)} / {info['epochs']}",
        "final test accuracy": f"{final:.2%}",
        "best test accuracy": f"{best:.2%}",
        "images generated (folded in)": len(records),
        "images asked for": delivery["asked"],
        "arrived on time (by the end of the next epoch)": delivery["on_time"],
        "arrived late": delivery["late"],
        "never arrived": delivery["never"],
        "posts skipped (generator lagging, max_inflight)": delivery["skipped_backpressure"],
        "--sync waits that timed out": delivery["wait_timeouts"],
        "seconds training": f"{training:.1f}",
        "seconds posting + folding": f"{talking:.1f}",
        "seconds waiting for the generator": f"{waiting:.1f}",
        "generator throughput": f"{overall:.3f} images/s" if overall else "n/a",
    }
    sections.append(
        "<table>"
        + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()
        )
        + "</table>"
    )
    if metrics:
        sections.append("<h2>Test accuracy</h2>")
        sections.append(
            f'<img class="plot" src="{_data_uri(_accuracy_plot(metrics, info["generation_epochs"]))}">'
        )
        sections.append("<h2>Time: training vs waiting</h2>")
        sections.append(f'<img class="plot" src="{_data_uri(_time_plot(metrics))}">')
    if records:
        sections.append("<h2>Generated images per class per epoch</h2>")
        sections.append(
            f'<img class="plot" src="{_data_uri(_per_class_plot(records, classes, info["epochs"]))}">'
        )
    if job_rows:
        sections.append("<h2>Generator throughput</h2>")
        sections.append(f'<img class="plot" src="{_data_uri(_throughput_plot(job_rows))}">')
    sections.append("<h2>Guide &rarr; generated</h2>")
    sections.append(f'<div class="gallery">{_gallery(run_dir, records, classes)}</div>')

    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>ActGen report {html.escape(info['run_id'])}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(sections)}</body></html>"
    )
    path = run_dir / REPORT_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
