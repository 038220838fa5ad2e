"""What fuse and fold did, block by block: frozen records that print as rich tables (rich is
imported when a report is printed, not with the library)."""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

Shapes = tuple[tuple[int, int], ...]  # (in_features, out_features) per projection


def _shapes(shapes: Shapes) -> str:
    return ", ".join(f"{i}->{o}" for i, o in shapes)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _row(table: Table, *cells: str) -> None:
    from rich.text import Text

    table.add_row(*(Text(c) for c in cells))  # Text: reasons hold "[...]", which is rich markup


def _render(table: Table) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(table)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class FusedBlock:
    path: str
    kind: str
    activation: str
    shapes: Shapes
    replacement: str  # class name of the fused module
    check: str  # the numerics-contract line of the proof, in the model's dtype
    hidden_dropout: float = 0.0  # p of the block's dropout of h, now applied in the kernels


def _result(f: FusedBlock) -> str:
    return f"-> {f.replacement}" + (f" (dropout of h p={f.hidden_dropout:g})" if f.hidden_dropout else "")


@dataclasses.dataclass(frozen=True)
class SkippedBlock:
    path: str
    reason: str
    kind: str = ""
    activation: str = ""
    shapes: Shapes = ()


@dataclasses.dataclass(frozen=True)
class FuseReport:
    """``fused``: the blocks replaced (or that would be, with ``dry_run``); ``skipped``: the blocks
    that looked like MLPs but were left alone, each with the reason."""

    fused: tuple[FusedBlock, ...] = ()
    skipped: tuple[SkippedBlock, ...] = ()
    dry_run: bool = False

    def table(self) -> Table:
        verb = "would fuse" if self.dry_run else "fused"
        title = f"fusedmlp.fuse: {len(self.fused)} {verb}, {len(self.skipped)} skipped"
        table = _table(title, ("module", "kind", "activation", "shapes", "result"))
        for f in self.fused:
            _row(table, f.path, f.kind, f.activation, _shapes(f.shapes), _result(f))
        for s in self.skipped:
            _row(table, s.path, s.kind, s.activation, _shapes(s.shapes), f"skipped: {s.reason}")
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        return _render(self.table())


@dataclasses.dataclass(frozen=True)
class FoldedRun:
    path: str  # the nn.Sequential
    layers: tuple[str, ...]  # the children merged, e.g. ("0", "1", "2")
    types: tuple[str, ...]
    shape: tuple[int, int]  # (in_features, out_features) of the merged Linear
    check: str


@dataclasses.dataclass(frozen=True)
class SkippedRun:
    path: str
    layers: tuple[str, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class FoldReport:
    folded: tuple[FoldedRun, ...] = ()
    skipped: tuple[SkippedRun, ...] = ()

    def table(self) -> Table:
        title = f"fusedmlp.fold: {len(self.folded)} folded, {len(self.skipped)} skipped"
        table = _table(title, ("sequential", "layers", "result"))
        for f in self.folded:
            merged = " + ".join(f"{n}:{t}" for n, t in zip(f.layers, f.types, strict=True))
            _row(table, f.path or "(model)", merged, f"-> Linear {f.shape[0]}->{f.shape[1]}")
        for s in self.skipped:
            _row(table, s.path or "(model)", " + ".join(s.layers), f"skipped: {s.reason}")
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        return _render(self.table())
