import json, sys, torch, triton, triton.testing
from fusedmlp.activations import Activation
from fusedmlp.kernels import narrow_mlp as nm

dev, dt = "cuda", torch.bfloat16
widths = [32] + [64] * 8 + [16]
acts = [Activation.RELU] * 8 + [Activation.IDENTITY]
L, P = len(acts), 64
g = torch.Generator().manual_seed(0)
w = torch.zeros(L, P, P)
b = torch.zeros(L, P)
for i in range(L):
    w[i, : widths[i + 1], : widths[i]] = torch.randn(widths[i + 1], widths[i], generator=g) / widths[i] ** 0.5
    b[i, : widths[i + 1]] = 0.1 * torch.randn(widths[i + 1], generator=g)
w, b = w.to(dev, dt), b.to(dev, dt)
M = 1 << 20
x = torch.randn(M, 32, generator=g).to(dev, dt)
dy = torch.randn(M, 16, generator=g).to(dev, dt)
ref = nm.narrow_mlp_backward(dy, x, w, b, widths, acts)


def t(fn):
    return triton.testing.do_bench(fn, return_mode="median") * 1e3, triton.testing.do_bench_cudagraph(
        fn, return_mode="median"
    ) * 1e3


rows = [
    {"what": "v2 shipped (64,4,2,seg3)", "us": t(lambda: nm.narrow_mlp_backward(dy, x, w, b, widths, acts))}
]
print(rows[-1], flush=True)
for seg in (1, 2, 3):
    for bm, warps, per_sm in ((64, 4, 2), (128, 8, 1), (64, 4, 1)):
        f = lambda: nm.narrow_mlp_backward_segmented(dy, x, w, b, widths, acts, bm, warps, per_sm, seg)
        try:
            out = f()
            rel = [
                ((o.float() - r.float()).abs().max() / r.float().abs().max()).item() for o, r in zip(out, ref)
            ]
            rows.append({"what": f"segmented ({bm},{warps},{per_sm},seg{seg})", "rel_vs_v2": rel, "us": t(f)})
        except Exception as e:
            rows.append({"what": f"segmented ({bm},{warps},{per_sm},seg{seg})", "error": str(e)[:300]})
        print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
