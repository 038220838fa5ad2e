"""Model surgery: find the MLP blocks of any model, prove the fused replacement, swap; undo; fold.

``fuse`` (find.py guesses by structure, verify.py proves, surgery.py swaps), ``unfuse``,
``fold`` (inference-only merging of affine layers) and their reports (report.py).
"""

from .find import MATCHERS, BlockKind, Candidate
from .fold import fold
from .report import FoldedRun, FoldReport, FusedBlock, FuseReport, SkippedBlock, SkippedRun
from .surgery import fuse, unfuse

__all__ = [
    "MATCHERS",
    "BlockKind",
    "Candidate",
    "FoldReport",
    "FoldedRun",
    "FuseReport",
    "FusedBlock",
    "SkippedBlock",
    "SkippedRun",
    "fold",
    "fuse",
    "unfuse",
]
