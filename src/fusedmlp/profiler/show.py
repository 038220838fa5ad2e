"""The summaries as rich tables in the terminal. Names from traces go through ``esc``: rich reads
``[...]`` in a string as markup, and a name such as ``[/]`` would make it raise."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape as esc
from rich.table import Table

from .analyze import VariantSummary

MAX_ROWS = 40  # kernels per variant in the terminal (slowest first); summary.json has all


def short(name: str, width: int = 64) -> str:
    """Kernel names run to hundreds of characters (ATen templates); keep the head and the tail."""
    return name if len(name) <= width else name[: width - 21] + "…" + name[-20:]


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def rate(value: float | None, peak: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return f"{text}{unit}" + (f" ({value / peak:.0%})" if peak else "")


def overview(summaries: list[VariantSummary], skipped: dict[str, str], console: Console) -> None:
    on_gpu = any(s.on_gpu for s in summaries)
    t = Table(title="variants side by side (per forward)")
    for col, right in (
        ("variant", False),
        ("kernels", True),
        ("guess", False),
        ("wall us", True),
        ("GPU us" if on_gpu else "op us", True),
        ("CPU us", True),
        ("launches", True),
        ("verdict", False),
        ("intermediates saved vs eager", True),
    ):
        t.add_column(col, justify="right" if right else "left")
    for s in summaries:
        if s.expected is None:
            guess = "no guess"
        elif not s.expected_notes:
            guess = f"[green]{len(s.expected)} as guessed[/green]"
        else:
            guess = f"[red]guessed {len(s.expected)}[/red]"
        t.add_row(
            esc(s.variant),
            str(s.kernels_per_forward),
            guess,
            "-" if s.wall_us is None else f"{s.wall_us:,.1f}",
            f"{s.gpu_us:,.1f}",
            f"{s.cpu_us:,.1f}",
            f"{sum(s.launches_per_forward.values()):g}",
            s.verdict,
            mb(s.intermediate_bytes_saved_vs_eager),
        )
    for name, why in skipped.items():
        t.add_row(esc(name), "-", "-", "-", "-", "-", "-", esc(why), "-", style="dim")
    console.print(t)
    for s in summaries:
        for problem in s.problems:
            console.print(f"[red]warning:[/red] {esc(s.variant)}: {esc(problem)}", highlight=False)


def details(s: VariantSummary, peaks: dict[str, float] | None, console: Console) -> None:
    t = Table(title=f"{esc(s.variant)}: {s.kernels_per_forward} kernels per forward ({s.forwards} forwards)")
    t.add_column("kernel")
    t.add_column("calls", justify="right")
    t.add_column("us", justify="right")
    t.add_column("decoded")
    t.add_column("expected as")
    t.add_column("TFLOP/s", justify="right")
    t.add_column("GB/s", justify="right")
    for k in s.kernels[:MAX_ROWS]:
        t.add_row(
            esc(short(k.name)),
            f"{k.calls:g}",
            f"{k.time_us:,.1f}",
            esc(k.decoded.summary()),
            esc(", ".join(k.roles)) or ("[red]not guessed[/red]" if s.expected is not None else "-"),
            rate(k.tflops, peaks and peaks["tflops"], ""),
            rate(k.gbps, peaks and peaks["gbps"], ""),
        )
    console.print(t)
    if len(s.kernels) > MAX_ROWS:
        console.print(f"  ... and {len(s.kernels) - MAX_ROWS:,} more kernels (all in summary.json)")
    console.print(f"  verdict: [bold]{s.verdict}[/bold]: {esc(s.verdict_reason)}")
    if s.host_costs:
        costs = ", ".join(f"{short(c['name'])} {c['us']:.1f} us" for c in s.host_costs[:3])
        console.print(f"  largest host costs per forward: {esc(costs)}", highlight=False)
    for note in s.expected_notes:
        console.print(f"  [red]guess vs trace:[/red] {esc(note)}")
    if s.launches_per_forward or s.occupancy_queries_per_forward:
        launches = ", ".join(f"{short(n)} x{c:g}" for n, c in list(s.launches_per_forward.items())[:8])
        console.print(
            f"  launches per forward: {esc(launches)}; occupancy queries: {s.occupancy_queries_per_forward:g}"
        )
    if s.cpu_ops_without_kernels:
        ops = ", ".join(f"{short(o['name'])} x{o['calls']:g}" for o in s.cpu_ops_without_kernels[:8])
        console.print(f"  CPU ops that launch no kernel: {esc(ops)}")
