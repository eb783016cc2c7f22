"""The ablation's page (OUT/index.html): bar chart, tables, per-arm diagnostics, thumbnails."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

from actgen_lab.arms import ARMS, BASELINES
from actgen_lab.table import (
    TESTBED_NOTE,
    ArmSummary,
    _is_testbed,
    _num,
    _setup_line,
    _title,
    summarize,
    table_rows,
    testbed_tables,
)
from actgen_trainer.report import STYLE, _data_uri

PAGE_NAME = "index.html"


def bar_chart_svg(rows: list[ArmSummary], width: int = 760, height: int = 330) -> str:
    """Inline SVG: mean test accuracy per arm with ± std error bars, on a zoomed y axis."""
    if not rows:
        return "<p>No finished cells yet.</p>"
    lows = [100 * (r.acc_mean - r.acc_std) for r in rows]
    highs = [100 * (r.acc_mean + r.acc_std) for r in rows]
    y0 = max(0.0, math.floor((min(lows) - 1) / 2) * 2)
    y1 = min(100.0, math.ceil((max(highs) + 0.5) / 2) * 2)
    y1 = max(y1, y0 + 2)
    left, right, top, bottom = 50, 10, 20, 95
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / len(rows)

    def y(value: float) -> float:
        return top + plot_h * (1 - (min(max(value, y0), y1) - y0) / (y1 - y0))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">'
    ]
    step = 1 if y1 - y0 <= 10 else 2 if y1 - y0 <= 20 else 5 if y1 - y0 <= 50 else 10
    tick = y0
    while tick <= y1 + 1e-9:
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            f'stroke="#e5e5e5"/><text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>'
        )
        tick += step
    parts.append(
        f'<text x="12" y="{top + plot_h / 2:.0f}" transform="rotate(-90 12 {top + plot_h / 2:.0f})" '
        f'text-anchor="middle">test accuracy % (axis from {y0:g})</text>'
    )
    for i, r in enumerate(rows):
        cx = left + slot * (i + 0.5)
        bw = slot * 0.6
        colour = "#888" if r.arm in BASELINES or r.arm == "focal" else "#3b7dd8"
        mean = 100 * r.acc_mean
        parts.append(
            f'<rect x="{cx - bw / 2:.1f}" y="{y(mean):.1f}" width="{bw:.1f}" '
            f'height="{top + plot_h - y(mean):.1f}" fill="{colour}"><title>{html.escape(r.arm)}: '
            f"{mean:.2f} ± {100 * r.acc_std:.2f} % ({len(r.seeds)} seeds)</title></rect>"
        )
        lo, hi = y(100 * (r.acc_mean - r.acc_std)), y(100 * (r.acc_mean + r.acc_std))
        parts.append(
            f'<path d="M{cx:.1f} {lo:.1f}V{hi:.1f}M{cx - 6:.1f} {lo:.1f}h12M{cx - 6:.1f} {hi:.1f}h12" '
            f'stroke="#222" fill="none"/>'
        )
        parts.append(f'<text x="{cx:.1f}" y="{hi - 4:.1f}" text-anchor="middle">{mean:.1f}</text>')
        base = top + plot_h + 12
        parts.append(
            f'<text x="{cx:.1f}" y="{base}" text-anchor="end" '
            f'transform="rotate(-35 {cx:.1f} {base})">{html.escape(r.arm)}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#222"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _thumbnails(out: Path, cells: list[dict[str, Any]]) -> str:
    """Guide -> generated pairs of an arm's first seed, inlined as data URIs."""
    if not cells or not cells[0]["examples"]:
        return "<p>No generated images.</p>"
    figures = []
    for pair in cells[0]["examples"]:
        guide, image = out / pair["guide"], out / pair["generated"]
        if guide.exists() and image.exists():
            figures.append(
                f'<figure><img src="{_data_uri(guide.read_bytes())}" alt="guide"><span>&rarr;</span>'
                f'<img src="{_data_uri(image.read_bytes())}" alt="generated">'
                f"<figcaption>{pair['class_id']} &middot; epoch {pair['epoch']}</figcaption></figure>"
            )
    return f'<p>seed {cells[0]["seed"]}</p><div class="gallery">{"".join(figures)}</div>'


def write_page(out: Path, cells: list[dict[str, Any]], results: dict[str, Any]) -> Path:
    """OUT/index.html, self-contained: the bar chart, the table, per-arm diagnostics and thumbnails."""
    rows = summarize(cells)

    def html_table(header: list[str], body: list[list[str]]) -> str:
        return (
            "<table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in body)
            + "</table>"
        )

    if _is_testbed(results):
        tables = [html_table(*t) for t in testbed_tables(rows)]
        note = f"<p>{html.escape(TESTBED_NOTE)}</p>"
    else:
        tables = [html_table(*table_rows(rows))]
        note = (
            "<p>Δ: paired by seed, 95 % t-interval, percentage points. hardness: the final classifier's "
            "mean cross-entropy on the arm's generated images; diversity: mean pairwise RMS pixel distance "
            "between generated images of one class; faithfulness: share read as their class by the "
            "reference classifier (RBF SVM on 8x8 grey levels of the real training split).</p>"
        )
    sections = [
        f"<h1>{html.escape(_title(results))}</h1>",
        f"<p>{html.escape(_setup_line(results, cells))}</p>",
        "<h2>Mean test accuracy ± std over seeds</h2>",
        bar_chart_svg(rows),
        "<h2>Per arm</h2>",
        *tables,
        note,
    ]
    arm_table = results.get("setup", {}).get("arms", ARMS)
    for r in rows:
        arm_cells = [c for c in cells if c["arm"] == r.arm]
        per_seed = ", ".join(f"{c['seed']}: {100 * c['test_acc']:.1f}" for c in arm_cells)
        sections.append(
            f"<h2>{html.escape(r.arm)}</h2><p><code>{html.escape(' '.join(arm_table.get(r.arm, [])))}</code>"
            f"<br>test accuracy by seed: {html.escape(per_seed)}<br>hardness {_num(r.hardness)}, "
            f"diversity {_num(r.diversity)}, faithfulness {_num(r.faithfulness, '.2f')}</p>"
        )
        if any(c["images_generated"] for c in arm_cells):
            sections.append(_thumbnails(out, arm_cells))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>ActGen ablation</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    path = out / PAGE_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
