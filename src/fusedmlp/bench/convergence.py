"""Training convergence: a small Llama-like model with eager MLPs and with fused ones.

Both start from the same weights and see the same synthetic, deterministic batches (next-token
prediction over sequences drawn from a fixed random bigram table), so their loss curves may
differ only by rounding. Used by tests/test_convergence.py (fp32, CPU) and, in bf16 on the GPU,
by benchmarks/convergence.py.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from ..fuse import fuse
from ..reference import GatedMLP


class TinyLlama(nn.Module):
    """Embedding, ``layers`` x (RMSNorm -> SwiGLU MLP, residual), RMSNorm, tied-free head."""

    def __init__(self, vocab: int, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(GatedMLP(dim, hidden, "silu") for _ in range(layers))
        self.final_norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            x = x + mlp(norm(x))
        return self.head(self.final_norm(x))


@dataclasses.dataclass(frozen=True)
class Setup:
    vocab: int = 64
    dim: int = 32
    hidden: int = 88
    layers: int = 2
    batch: int = 4
    seq: int = 16
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0


def batches(setup: Setup, device: torch.device | str) -> list[Tensor]:
    """Deterministic token sequences from a fixed random bigram table (learnable structure)."""
    g = torch.Generator().manual_seed(setup.seed + 1)
    table = torch.softmax(torch.randn(setup.vocab, setup.vocab, generator=g) * 3, dim=-1)
    out = []
    for _ in range(setup.steps):
        ids = torch.empty(setup.batch, setup.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(setup.vocab, (setup.batch,), generator=g)
        for t in range(1, setup.seq):
            ids[:, t] = torch.multinomial(table[ids[:, t - 1]], 1, generator=g).squeeze(1)
        out.append(ids.to(device))
    return out


def train(model: nn.Module, data: list[Tensor], lr: float, autocast: torch.dtype | None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    device_type = data[0].device.type
    losses = []
    for ids in data:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run(
    setup: Setup, device: torch.device | str = "cpu", autocast: torch.dtype | None = None
) -> dict[str, list[float]]:
    """Loss curves of the eager and the fused model from the same initial weights."""
    torch.manual_seed(setup.seed)
    eager = TinyLlama(setup.vocab, setup.dim, setup.hidden, setup.layers).to(device)
    fused = copy.deepcopy(eager)
    report = fuse(fused)
    if len(report.fused) != setup.layers:
        raise RuntimeError(f"expected {setup.layers} fused MLPs, got:\n{report}")
    data = batches(setup, device)
    return {"eager": train(eager, data, setup.lr, autocast), "fused": train(fused, data, setup.lr, autocast)}
