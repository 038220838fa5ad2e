"""Dropout of h (between the activation and the output projection), as the kernels apply it:
nn.Dropout's keep probability 1 - p and scaling 1 / (1 - p), the mask a function of a seed that
torch's generator draws (so torch.manual_seed governs it, and CUDA graphs replay fresh masks)
and of each element's index. The forward applies it in its epilogue, the backward regenerates
the same mask from the same seed: nothing [tokens, hidden]-sized is stored. No Triton here: the
torch reference (:meth:`Dropout.mask`) hashes the same seed and indices with tensor arithmetic,
a different stream of the same distribution.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (xor-shift-multiply) on int64 tensors holding values < 2^32; the
    multipliers are below 2^31, so no product leaves int64's range."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class Dropout:
    """``seed``: a one-element int64 tensor on the kernels' device. ``width``: the columns of
    the whole h the mask spans; ``col0``: the first column of the block a launch covers."""

    seed: Tensor
    p: float
    width: int
    col0: int = 0

    @staticmethod
    def draw(p: float, width: int, device: torch.device, col0: int = 0) -> Dropout:
        """A fresh mask: a seed drawn from torch's generator for ``device`` (no host sync)."""
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
        return Dropout(seed, p, width, col0)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0

    def args(self) -> tuple[Tensor, float, float, int, int]:
        """The kernels' dropout arguments (seed_ptr, p, scale, width, col0)."""
        return (self.seed, float(self.p), self.scale, self.width, self.col0)

    @staticmethod
    def no_args(anchor: Tensor, width: int) -> tuple[Tensor, float, float, int, int]:
        """Placeholders for launches without dropout (DROPOUT off: never read)."""
        return (anchor, 0.0, 1.0, width, 0)

    def block(self, col0: int) -> Dropout:
        """The columns from ``col0`` on (relative to this one's first)."""
        return dataclasses.replace(self, col0=self.col0 + col0)

    def mask(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        """The torch reference's mask for columns col0..col0+cols: keep / (1 - p) or 0, a hash of
        the seed and each element's flat index (regenerated identically in a backward; plain
        tensor arithmetic, so traced code can compute it without reading the seed on the host)."""
        dev = self.seed.device
        columns = self.col0 + torch.arange(cols, device=dev)
        index = torch.arange(rows, device=dev)[:, None] * self.width + columns
        x = _hash32((index & _M32) ^ (self.seed & _M32))
        x = _hash32(x ^ ((index >> 32) & _M32) ^ 0x5BD1E995)
        uniform = (x >> 8).to(torch.float64) / float(1 << 24)  # 24 bits: [0, 1)
        return (uniform >= self.p).to(dtype) * self.scale
