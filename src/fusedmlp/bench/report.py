"""Rendering benchmark records: a rich table per case, a markdown summary and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


_COLUMNS = (
    ("us", "fwd us", ".1f"),
    ("graph_us", "CUDA-graph us", ".1f"),
    ("vs_floor", "vs floor", ".2f"),
    ("tflops", "TFLOP/s", ".0f"),
    ("pct_peak_flops", "% peak", ".0f"),
    ("pct_copy_bw_weights", "% copy bw (weights)", ".0f"),
    ("rel_err", "rel err", ".1e"),
    ("train_us", "fwd+bwd us", ".1f"),
    ("train_graph_us", "fwd+bwd CUDA-graph us", ".1f"),
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
    path.write_text("\n".join(lines))


def _gpu_ratio(case: dict[str, Any], name: str) -> float | None:
    """GPU time over the floor's: CUDA-graph times when both exist (host overhead removed), else
    the do_bench medians."""
    r, floor = case["variants"].get(name, {}), case["variants"].get("floor", {})
    for key in ("graph_us", "us"):
        if r.get(key) and floor.get(key):
            return r[key] / floor[key]
    return None


def plot(record: dict[str, Any], path: Path) -> None:
    """Forward GPU time relative to the cuBLAS floor, per case and variant (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in record["cases"] if "us" in c["variants"].get("floor", {})]
    names = [
        n
        for n in (
            "eager",
            "eager-merged",
            "compile",
            "compile-max-autotune",
            "liger",
            "fusedmlp",
            "fusedmlp-none",
            "fusedmlp-gemm",
        )
        if any(_gpu_ratio(c, n) for c in cases)
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(cases)), 4))
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        vals = [_gpu_ratio(c, n) or 0 for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{c['preset'].split('@')[0]}\nM={c['M']}" for c in cases], fontsize=8)
    ax.set_ylabel("forward GPU time / cuBLAS GEMM floor")
    ax.set_title(
        f"{record['env']['gpu']}, {cases[0]['dtype'] if cases else ''} (CUDA-graph times where measured)"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
