"""GPU time of the fused MLP from two source trees, in one run: does a change (a restructure) move
the kernels? Each tree runs in its own process (its own fusedmlp import), the two alternate
(--rounds times), and every number is a CUDA-graph replay median (GPU time, no host work).

Run on the GPU: python3 benchmarks/compare_trees.py OLD_SRC NEW_SRC [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import torch, triton.testing
from fusedmlp import FusedGatedMLP, FusedMLP
from fusedmlp.reference import GatedMLP, MLP
torch.manual_seed(0)
out = {}
for name, (M, D, H, gated, act, bias) in {
    "geglu-article": (8192, 768, 3072, True, "gelu_tanh", False),
    "llama3-8b": (4096, 4096, 14336, True, "silu", False),
    "decode-M1": (1, 4096, 14336, True, "silu", False),
}.items():
    eager = (GatedMLP if gated else MLP)(D, H, act, bias=bias, device="cuda", dtype=torch.bfloat16)
    fused = (FusedGatedMLP if gated else FusedMLP).from_module(eager)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    def step():
        xg.grad = None
        for p in fused.parameters():
            p.grad = None
        fused(xg).backward(dy)
    with torch.no_grad():
        fused(x)
        fwd = triton.testing.do_bench_cudagraph(lambda: fused(x), rep=200, return_mode="median") * 1e3
    step()
    train = triton.testing.do_bench_cudagraph(step, rep=200, return_mode="median") * 1e3 if M > 1 else None
    out[name] = {"fwd_graph_us": fwd, "train_graph_us": train}
print(json.dumps(out))
"""


def run(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{src}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of old and new")
    args = ap.parse_args()
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            runs[which].append(run(getattr(args, which)))
    rows = {}
    for case in runs["new"][0]:
        for key in ("fwd_graph_us", "train_graph_us"):
            old = [r[case][key] for r in runs["old"] if r[case][key]]
            new = [r[case][key] for r in runs["new"] if r[case][key]]
            if old and new:
                rows[f"{case} {key}"] = {"old": min(old), "new": min(new), "new/old": min(new) / min(old)}
    for k, v in rows.items():
        print(f"{k:34s} old {v['old']:9.1f}  new {v['new']:9.1f}  new/old {v['new/old']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "summary": rows}, f, indent=1)


if __name__ == "__main__":
    main()
