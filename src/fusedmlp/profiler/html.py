"""report.html: one self-contained page (plots inlined as data: URIs, no scripts or styles
fetched from anywhere) that opens offline, e.g. from a CI artifact or an e-mail."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.figure import Figure  # not pyplot: no backend or global state, works headless
from matplotlib.patches import Rectangle

from .analyze import VariantSummary
from .show import mb, rate, short

_COLORS = {"gemm": "#3b6fb6", "memory": "#e8893a", "other": "#9a9a9a"}


def _group(kind: str, is_gemm: bool) -> str:
    if is_gemm:
        return "gemm"
    if kind in ("unknown", "memcpy", "memset", "collective"):
        return "other"
    return "memory"  # elementwise, pointwise, reductions, fused ops: they move memory


def _svg_uri(fig: Figure) -> str:
    """An <img>-ready data URI. Each plot is its own document, so matplotlib's element ids
    cannot collide between plots as they could if the SVGs were pasted inline."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def timeline_plot(summaries: list[VariantSummary]) -> str:
    """The first forward of each variant, kernel by kernel, on one time axis."""
    fig = Figure(figsize=(9, 0.6 + 0.55 * len(summaries)))
    ax = fig.subplots()
    for row, s in enumerate(summaries):
        kinds = {k.name: k.decoded for k in s.kernels}
        for step in s.timeline:
            d = kinds.get(step.name)
            group = _group(step.kind, bool(d and d.is_gemm))
            ax.broken_barh([(step.start_us, max(step.dur_us, 0.01))], (row - 0.35, 0.7), color=_COLORS[group])
    ax.set_yticks(range(len(summaries)), [s.variant for s in summaries])
    ax.invert_yaxis()
    unit = "us (GPU)" if any(s.on_gpu for s in summaries) else "us (CPU ops)"
    ax.set_xlabel(f"time from the forward's first kernel, {unit}")
    ax.set_title("kernel timeline, one forward per variant")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    legend_outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8}
    ax.legend(handles, ["GEMM", "elementwise / fused (memory)", "other"], **legend_outside)
    return _svg_uri(fig)


def breakdown_plot(summaries: list[VariantSummary]) -> str:
    """Kernel time split into GEMM / memory / other, next to the CPU time of one forward."""
    fig = Figure(figsize=(9, 0.8 + 0.7 * len(summaries)))
    ax = fig.subplots()
    for row, s in enumerate(summaries):
        left = 0.0
        for group, color in _COLORS.items():
            width = sum(k.time_us for k in s.kernels if _group(k.decoded.kind, k.decoded.is_gemm) == group)
            ax.barh(row - 0.18, width, left=left, height=0.34, color=color)
            left += width
        ax.barh(row + 0.18, s.cpu_us, height=0.34, color="#5aa469")
    ax.set_yticks(range(len(summaries)), [s.variant for s in summaries])
    ax.invert_yaxis()
    ax.set_xlabel("us per forward")
    ax.set_title("time breakdown: kernels (top bar) and CPU dispatch (bottom bar)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in (*_COLORS.values(), "#5aa469")]
    ax.legend(
        handles,
        ["GEMM", "memory-bound kernels", "other", "CPU time"],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    return _svg_uri(fig)


def roofline_plot(summaries: list[VariantSummary], peaks: dict[str, float] | None) -> str:
    """Achieved TFLOP/s against arithmetic intensity for every kernel with known FLOPs and bytes."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    points = [(s, k) for s in summaries for k in s.kernels if k.flops and k.bytes and k.tflops]
    xs = [k.flops / k.bytes for _, k in points] or [1.0]
    if peaks:
        lo, hi = min(min(xs) / 4, 0.1), max(max(xs) * 4, 2 * peaks["tflops"] * 1e3 / peaks["gbps"])
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(peaks["tflops"], x * peaks["gbps"] / 1e3) for x in grid], "k-", lw=1.2)
        ax.text(hi, peaks["tflops"], f"{peaks['tflops']:.0f} TFLOP/s measured", ha="right", va="bottom")
    markers = "osD^v<>p*"
    for i, s in enumerate(summaries):
        mine = [k for t, k in points if t is s]
        if mine:
            ax.scatter(
                [k.flops / k.bytes for k in mine],
                [k.tflops for k in mine],
                marker=markers[i % 9],
                label=s.variant,
            )
    if points:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no kernel with known FLOPs (no preset in the traces)",
            ha="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("arithmetic intensity, FLOP per byte (from the preset's shapes)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title("roofline" + ("" if peaks else " (no peaks measured: CPU run or foreign trace)"))
    return _svg_uri(fig)


def render(summary: dict[str, Any], summaries: list[VariantSummary], out: Path) -> Path:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fusedmlp.profiler", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,  # a typo in the template fails the test, not the reader
    )
    env.filters.update(short=short, mb=mb, rate=rate)
    peaks = summary.get("peaks")
    html = env.get_template("report.html.j2").render(
        summary=summary,
        summaries=summaries,
        peaks=peaks,
        plots={
            "timeline": timeline_plot(summaries),
            "breakdown": breakdown_plot(summaries),
            "roofline": roofline_plot(summaries, peaks),
        },
    )
    out.write_text(html, encoding="utf-8")
    return out
