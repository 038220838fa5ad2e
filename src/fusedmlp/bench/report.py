"""Rendering benchmark records: a rich table per case, a markdown summary and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ..profiler.trace import write_atomic


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


_COLUMNS = (
    ("wall_us", "wall us", ".1f"),
    ("host_us", "host us", ".1f"),
    ("graph_us", "GPU us (graph)", ".1f"),
    ("wall_vs_eager", "wall / eager", ".2f"),
    ("wall_vs_compile", "wall / compile", ".2f"),
    ("vs_floor", "GPU / floor", ".2f"),
    ("tflops", "TFLOP/s", ".0f"),
    ("pct_peak_flops", "% peak", ".0f"),
    ("pct_copy_bw_weights", "% copy bw (weights)", ".0f"),
    ("rel_err", "rel err", ".1e"),
    ("train_wall_us", "fwd+bwd wall us", ".1f"),
    ("train_host_us", "fwd+bwd host us", ".1f"),
    ("train_graph_us", "fwd+bwd GPU us (graph)", ".1f"),
    ("train_wall_vs_eager", "fwd+bwd wall / eager", ".2f"),
    ("train_wall_vs_compile", "fwd+bwd wall / compile", ".2f"),
    ("train_extra_peak_mib", "extra peak MiB", ".1f"),
)


def _title(case: dict[str, Any]) -> str:
    return (
        f"{case['preset']}: M={case['M']}, {case['D']} -> {case['H']}, {case['activation']}"
        f"{' gated' if case['gated'] else ''}{' +bias' if case['bias'] else ''}, {case['dtype']}"
    )


def case_table(case: dict[str, Any]) -> Table:
    table = Table(title=_title(case))
    table.add_column("variant")
    cols = [c for c in _COLUMNS if any(c[0] in r for r in case["variants"].values())]
    for _, head, _ in cols:
        table.add_column(head, justify="right")
    for name, r in case["variants"].items():
        if "skipped" in r:
            table.add_row(name, *(["-"] * (len(cols) - 1)), f"skipped: {r['skipped']}")
        else:
            table.add_row(name, *(_fmt(r.get(k), spec) for k, _, spec in cols))
    return table


def write_markdown(record: dict[str, Any], path: Path) -> None:
    env, peaks = record["env"], record["peaks"]
    lines = [
        f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
        f"{env['date']}.",
        f"Measured peaks in this run: bf16 matmul {peaks['tflops']:.0f} TFLOP/s, "
        f"device copy {peaks['gbps']:.0f} GB/s.",
        "",
    ]
    for case in record["cases"]:
        cols = [c for c in _COLUMNS if any(c[0] in r for r in case["variants"].values())]
        lines += [
            f"### {_title(case)}",
            "",
            "| variant | " + " | ".join(h for _, h, _ in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for name, r in case["variants"].items():
            cells = ["skipped"] if "skipped" in r else [_fmt(r.get(k), s) for k, _, s in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    write_atomic({path: "\n".join(lines)})


def _ratio(case: dict[str, Any], name: str, key: str, base: str) -> float | None:
    r, b = case["variants"].get(name, {}), case["variants"].get(base, {})
    return r[key] / b[key] if r.get(key) and b.get(key) else None


def plot(record: dict[str, Any], path: Path) -> None:
    """Two panels per case and variant (lower is better): GPU time (CUDA graph) over the cuBLAS
    floor's, and wall time (back-to-back, host included) over eager's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = record["cases"]
    eager = record.get("baseline", "eager")  # the MoE records' baseline is Hugging Face's path, "hf"
    panels = (
        ("graph_us", "floor", "forward GPU time / GEMM floor (CUDA graph)"),
        ("wall_us", eager, f"forward wall time / {eager}'s (back-to-back, host included)"),
    )
    every = list(dict.fromkeys(n for c in cases for n in c["variants"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3.2 * len(cases)), 4.2))
    for ax, (key, base, title) in zip(axes, panels, strict=True):
        names = [n for n in every if n != base and any(_ratio(c, n, key, base) for c in cases)]
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            vals = [_ratio(c, n, key, base) or 0 for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=n)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{c['preset'].split('@')[0]}\nM={c['M']}" for c in cases], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"{record['env']['gpu']}, {cases[0]['dtype'] if cases else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
