"""bf16 training of the small Llama-like model with eager and fused MLPs: curves, JSON and a plot.

Run on the GPU: PYTHONPATH=src python3 benchmarks/convergence.py --out DIR
The same setup as tests/test_convergence.py's GPU test (src/fusedmlp/bench/convergence.py).
"""

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fusedmlp.bench import convergence


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    setup = convergence.Setup(dim=256, hidden=704, layers=4, batch=8, seq=128, steps=300)
    curves = convergence.run(setup, "cuda", autocast=torch.bfloat16)
    gap = max(abs(f - e) / abs(e) for e, f in zip(curves["eager"], curves["fused"], strict=True))
    record = {"setup": dataclasses.asdict(setup), "curves": curves, "worst_relative_gap": gap,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.json").write_text(json.dumps(record, default=str))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(losses, label=f"{name} MLPs", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (bf16 autocast)")
    ax.set_title(f"TinyLlama, 4 layers, eager vs fused: worst gap {gap:.1e} of the loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "convergence.png", dpi=110)
    eager, fused = curves["eager"], curves["fused"]
    print(f"loss {eager[0]:.3f} -> eager {eager[-1]:.4f}, fused {fused[-1]:.4f}; worst gap {gap:.2e}")


if __name__ == "__main__":
    main()
