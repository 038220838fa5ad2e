"""report.html: one self-contained page (plots inlined as data: URIs, no scripts or styles
fetched from anywhere) that opens offline, e.g. from a CI artifact or an e-mail.

Names come from trace files: the page escapes them (jinja2 autoescape), plot labels escape
matplotlib's mathtext ``$``, and trace.load has already replaced control characters (which SVG,
being XML, cannot hold). The page is built in memory; ``render`` writes it in one step."""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.figure import Figure  # not pyplot: no backend or global state, works headless
from matplotlib.patches import Rectangle

from .analyze import VariantSummary
from .show import mb, rate, short
from .trace import write_atomic

MAX_TABLE_ROWS = 200  # kernels (and other lists) per variant on the page; summary.json has all

_COLORS = {"gemm": "#3b6fb6", "memory": "#e8893a", "other": "#9a9a9a"}


def _group(kind: str, is_gemm: bool) -> str:
    if is_gemm:
        return "gemm"
    if kind in ("unknown", "memcpy", "memset", "collective"):
        return "other"
    return "memory"  # elementwise, pointwise, reductions, fused ops: they move memory


def _label(text: str) -> str:
    """A plot label shown as written: short, and no ``$`` starting matplotlib's mathtext (which
    fails to draw unbalanced or unknown TeX)."""
    return short(text, 48).replace("$", r"\$")


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
        spans: dict[str, list[tuple[float, float]]] = {group: [] for group in _COLORS}
        for step in s.timeline:
            d = kinds.get(step.name)
            spans[_group(step.kind, bool(d and d.is_gemm))].append((step.start_us, max(step.dur_us, 0.01)))
        for group, bars in spans.items():  # one artist per colour: thousands of kernels draw fast
            if bars:
                ax.broken_barh(bars, (row - 0.35, 0.7), color=_COLORS[group])
    ax.set_yticks(range(len(summaries)), [_label(s.variant) for s in summaries])
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
    ax.set_yticks(range(len(summaries)), [_label(s.variant) for s in summaries])
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
                label=_label(s.variant),
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


_PROBLEMS = jinja2.Template(
    """{% if problems %}<div id="problems" class="bad"><p><b>Problems in the traces</b> (what was
left out of every number below or cut, and why):</p><ul>
{% for variant, text in problems %}<li>{{ variant }}: {{ text }}</li>
{% endfor %}</ul></div>{% endif %}""",
    autoescape=True,
)


def _shown(s: VariantSummary) -> VariantSummary:
    """``s`` with its lists cut to what a page can show (a trace may name a million kernels)."""
    n = MAX_TABLE_ROWS
    return dataclasses.replace(
        s,
        kernels=s.kernels[:n],
        memory_ops=s.memory_ops[:n],
        cpu_ops_without_kernels=s.cpu_ops_without_kernels[:n],
        launches_per_forward=dict(list(s.launches_per_forward.items())[:n]),
    )


@functools.cache
def _environment() -> jinja2.Environment:
    """One per process: compiling the template costs more than rendering it."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fusedmlp.profiler", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,  # a typo in the template fails the test, not the reader
    )
    env.filters.update(short=short, mb=mb, rate=rate)
    return env


def render(summary: dict[str, Any], summaries: list[VariantSummary], out: Path | None = None) -> str:
    """The page, as text; also written to ``out`` (atomically) when given."""
    env = _environment()
    peaks = summary.get("peaks")
    shown = [_shown(s) for s in summaries]
    html = env.get_template("report.html.j2").render(
        summary=summary,
        summaries=shown,
        peaks=peaks,
        plots={
            "timeline": timeline_plot(summaries),
            "breakdown": breakdown_plot(summaries),
            "roofline": roofline_plot(summaries, peaks),
        },
    )
    problems = _PROBLEMS.render(problems=[(s.variant, p) for s in summaries for p in s.problems])
    html = html.replace("</h1>", "</h1>\n" + problems, 1) if problems else html
    if out is not None:
        write_atomic({out: html})
    return html
