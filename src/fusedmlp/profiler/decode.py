"""Kernel names, decoded: which library wrote the kernel, what kind of work it does, and the
tile / stage / cluster / layout / dtype / epilogue choices the name spells out.

Names are read by pattern, never by a lookup of whole names, so kernels of other GPUs and
library versions decode too; fields a name does not carry stay None. A name no pattern knows
decodes as library "unknown": the decoder never raises on a string.

Name families (all seen in torch.profiler traces):
- cuBLAS nvjet (Hopper+): ``nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT`` = tile 256x128,
  k-tile 64 x 4 stages, cluster 1x2, raster h, flags, cooperative variant A, layout TNT.
- cuBLAS xmma / cutlass / ampere: ``sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_...``,
  ``ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn``, ``cutlass_80_tensorop_...``.
- Triton from Inductor: ``triton_{poi,red,per,tem,for}_fused_<ops>_<n>``; Inductor's C++ (CPU)
  kernels ``cpp_fused_<ops>_<n>``.
- User Triton kernels: plain identifiers such as ``_act_fwd_kernel`` (fusedmlp) or
  ``_geglu_tanh_forward_kernel`` (Liger).
- ATen CUDA kernels: ``void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl...``.
- Copies and fills: ``Memcpy DtoD (Device -> Device)``, ``Memset (Device)``.
- CPU ops (traces without a GPU): ``aten::mm``, ``fusedmlp::gated_act``.

Names come from trace files, which are untrusted: every pattern here runs in time linear in the
name (no nested or overlapping quantifiers that can backtrack over the same text twice, no lazy
scan tried from every position), and names are cut to MAX_NAME_CHARS before decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

# Kinds. GEMM-like kinds are compute work; the rest move memory.
GEMM = "gemm"
ELEMENTWISE = "elementwise"
REDUCTION = "reduction"
MEMCPY = "memcpy"
MEMSET = "memset"
UNKNOWN = "unknown"

MAX_NAME_CHARS = 4096  # longer names are cut first (the longest ATen kernel names are ~1,500)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """What a kernel name says. ``library`` and ``kind`` are always set; the rest when named."""

    library: str
    kind: str
    op: str | None = None  # the operation in words ("gelu", "mul", "gated activation forward")
    ops: tuple[str, ...] = ()  # fused op list (Inductor)
    arch: str | None = None  # "sm90"
    tile: str | None = None  # "MxN" of the output tile
    k_tile: int | None = None
    stages: int | None = None
    cluster: str | None = None  # thread-block cluster "1x2"
    layout: str | None = None  # operand transposes as cuBLAS writes them: "TN", "TNT"
    dtype: str | None = None
    epilogue: str | None = None  # "bias", "relu", "gelu", ...
    variant: str | None = None  # "coopA", "pingpong", "warpgroups 2x1x1", ...
    flags: tuple[str, ...] = ()  # name parts kept verbatim whose meaning is not documented

    @property
    def is_gemm(self) -> bool:
        return self.kind == GEMM or (self.kind == "template" and any("mm" in o for o in self.ops))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without the empty fields."""
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v not in (None, ())}

    def summary(self) -> str:
        """One short line for tables: 'cuBLAS (nvjet) gemm sm90 tile 256x128 k64 x4 stages ...'."""
        parts = [self.library, self.kind]
        if self.op:
            parts.append(self.op)
        if self.ops:
            parts.append("+".join(self.ops))
        for label, value in (
            ("", self.arch),
            ("tile ", self.tile),
            ("k", self.k_tile),
            ("stages ", self.stages),
            ("cluster ", self.cluster),
            ("", self.layout),
            ("", self.dtype),
            ("epilogue ", self.epilogue),
            ("", self.variant),
        ):
            if value is not None:
                parts.append(f"{label}{value}")
        return " ".join(str(p) for p in parts)


_EPILOGUES = ("bias", "relu", "gelu", "gelu_aux", "dgelu", "bgrad", "drelu", "swish", "silu", "aux")
_LAYOUT = re.compile(r"[TN]{2,3}")

# nvjet_[sm90_]<family>_<M>x<N>_<K>x<stages>_<cx>x<cy>_<rest...>, matched once, from the first
# "nvjet_": searching would retry the scan of <rest> from every later "nvjet_" (quadratic).
_NVJET = re.compile(
    r"nvjet_(?:(?P<arch>sm\d+)_)?(?P<family>[a-z0-9]+)_(?P<m>\d+)x(?P<n>\d+)_(?P<k>\d+)x(?P<stages>\d+)"
    r"_(?P<cx>\d+)x(?P<cy>\d+)(?P<rest>_\w+)?$"
)


def _nvjet(name: str) -> Decoded | None:
    start = name.find("nvjet_")
    m = _NVJET.match(name, start) if start >= 0 else None
    if m is None:
        return None
    rest = [t for t in (m["rest"] or "").split("_") if t]
    layout = rest.pop() if rest and _LAYOUT.fullmatch(rest[-1]) else None
    epilogue = [t for t in rest if t.lower() in _EPILOGUES]
    variant = [t for t in rest if t.startswith("coop") or t in ("pingpong", "splitK", "streamK")]
    named = {*epilogue, *variant}
    flags = tuple(t for t in rest if t not in named)
    return Decoded(
        library="cuBLAS (nvjet)",
        kind=GEMM,
        arch=m["arch"],
        tile=f"{m['m']}x{m['n']}",
        k_tile=int(m["k"]),
        stages=int(m["stages"]),
        cluster=f"{m['cx']}x{m['cy']}",
        layout=layout,
        epilogue="+".join(epilogue) or None,
        variant="+".join(variant) or None,
        # "h"/"v" (raster order, by the look of it) and "bz" stay verbatim: cuBLAS does not document them
        flags=(m["family"], *flags),
    )


_BLAS_LETTERS = {"s": "fp32", "d": "fp64", "h": "fp16"}  # BLAS prefixes: sgemm, dgemm, hgemm
_ARCH_WORDS = {"volta": "sm70", "turing": "sm75", "ampere": "sm80", "hopper": "sm90", "blackwell": "sm100"}


def _cublas_family(name: str) -> Decoded | None:
    """xmma / cutlass / ampere-style cuBLAS and CUTLASS GEMM names."""
    low = name.lower()
    if not re.search(r"gemm|xmma|cutlass|s16816|s1688|tensorop", low):
        return None
    arch = None
    if (m := re.search(r"(?<![a-z0-9])sm_?(\d{2,3})", low)) or (
        m := re.search(r"cutlass(?:3x)?_(\d{2,3})", low)
    ):
        arch = f"sm{m[1]}"
    else:
        arch = next((a for w, a in _ARCH_WORDS.items() if w in low), None)
    if "xmma" in low:
        library = "cuBLAS (xmma)"
    elif "cutlass" in low:
        library = "CUTLASS"
    else:
        library = "cuBLAS"
    tile = k_tile = stages = cluster = variant = None
    if m := re.search(r"tilesize(\d+)x(\d+)x(\d+)", low):  # xmma
        tile, k_tile = f"{m[1]}x{m[2]}", int(m[3])
    elif m := re.search(r"_(\d+)x(\d+)x(\d+)_(\d+)x(\d+)x(\d+)_", low):  # cutlass 3.x: tile, cluster
        tile, k_tile, cluster = f"{m[1]}x{m[2]}", int(m[3]), f"{m[4]}x{m[5]}"
    elif m := re.search(r"_(\d+)x(\d+)_(?:ldg\d+_(?:[a-z0-9]+_){0,4}?stages_)?(\d+)x(\d+)_", low):  # ampere
        tile, k_tile, stages = f"{m[1]}x{m[2]}", int(m[3]), int(m[4])
    elif m := re.search(r"_(\d+)x(\d+)_(?:tn|nt|nn|tt)(?:_|$)", low):  # ampere_sgemm_128x64_tn
        tile = f"{m[1]}x{m[2]}"
    if stages is None and (m := re.search(r"stage(\d+)", low)):
        stages = int(m[1])
    if m := re.search(r"warpgroupsize(\d+x\d+x\d+)", low):
        variant = f"warpgroups {m[1]}"
    elif "cooperative" in low or "pingpong" in low:
        variant = "cooperative" if "cooperative" in low else "pingpong"
    layout = None
    if m := re.search(r"_(tn|nt|nn|tt)(?:_?([nt]))?(?=_|$)", low):
        layout = (m[1] + (m[2] or "")).upper()
    dtype = None
    if (
        (m := re.search(r"_(bf16|f16|fp16|f32|tf32|e4m3|e5m2|h|s)(?:bf16|f16|f32)?_?(?:s\d+gemm|gemm)", low))
        or (m := re.search(r"gemm_((?:[a-z0-9]+_){0,4}?[a-z0-9]+)_(?:tn|nt|nn|tt)_", low))
        or (m := re.search(r"(bf16|f16|fp16|tf32)", low))
    ):
        dtype = _BLAS_LETTERS.get(m[1], m[1])
    epilogue = next((e for e in ("bias", "relu", "gelu") if re.search(rf"(?<![a-z]){e}(?![a-z])", low)), None)
    return Decoded(
        library=library,
        kind=GEMM,
        arch=arch,
        tile=tile,
        k_tile=k_tile,
        stages=stages,
        cluster=cluster,
        layout=layout,
        dtype=dtype,
        epilogue=epilogue,
        variant=variant,
    )


# Inductor: triton_<kind>_fused_<op>_<op>..._<n>. Ops are aten names joined by "_", so the
# multi-word names are matched first to split "_unsafe_view_gelu_mul" into its three ops.
_INDUCTOR_KINDS = {
    "poi": "pointwise",
    "red": "reduction",
    "per": "persistent-reduction",
    "tem": "template",
    "for": "foreach",
}
_MULTI_WORD_OPS = {
    "unsafe_view",
    "to_copy",
    "native_layer_norm",
    "native_dropout",
    "convert_element_type",
    "threshold_backward",
    "gelu_backward",
    "silu_backward",
    "sigmoid_backward",
    "tanh_backward",
    "var_mean",
    "split_with_sizes",
    "scaled_dot_product",
    "log_softmax",
    "native_batch_norm",
    "new_empty",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "index_put",
    "scatter_add",
    "embedding_dense_backward",
    "lift_fresh",
    "masked_fill",
    "constant_pad_nd",
    "rand_like",
    "randn_like",
}
_LONGEST_OP = max(len(o.split("_")) for o in _MULTI_WORD_OPS)


def split_fused_ops(text: str) -> tuple[str, ...]:
    """'_unsafe_view_gelu_mul' -> ('_unsafe_view', 'gelu', 'mul')."""
    tokens = text.split("_")
    ops: list[str] = []
    i = 0
    while i < len(tokens):
        prefix = ""
        while i < len(tokens) and tokens[i] == "":  # an empty token: the next op starts with "_"
            prefix += "_"
            i += 1
        if i == len(tokens):
            break
        for width in range(min(_LONGEST_OP, len(tokens) - i), 0, -1):
            candidate = "_".join(tokens[i : i + width])
            if width == 1 or candidate in _MULTI_WORD_OPS:
                ops.append(prefix + candidate)
                i += width
                break
    return tuple(ops)


_INDUCTOR = re.compile(r"^triton_(?P<kind>[a-z]+)_(?:fused_(?P<ops>\w+?)_)?(?P<n>\d+)$")
_INDUCTOR_CPP = re.compile(r"^(?:graph_\d+_)?cpp_fused_(?P<ops>\w+?)_(?P<n>\d+)$")


def _inductor(name: str) -> Decoded | None:
    if m := _INDUCTOR.match(name):
        kind = _INDUCTOR_KINDS.get(m["kind"], m["kind"])
        return Decoded(library="Triton (Inductor)", kind=kind, ops=split_fused_ops(m["ops"] or ""))
    if m := _INDUCTOR_CPP.match(name):
        return Decoded(library="C++ (Inductor, CPU)", kind="fused", ops=split_fused_ops(m["ops"]))
    return None


# Other libraries' Triton kernels whose names we know; fusedmlp's own kernels declare their
# profiles next to them (kernels/*.py PROFILES). Other plain identifiers ending in "kernel" are
# taken as user Triton kernels too (ATen and cuBLAS names never look like that).
_LIGER_TRITON = {
    "_geglu_tanh_forward_kernel": "geglu (tanh) forward",
    "_geglu_tanh_backward_kernel": "geglu (tanh) backward",
    "_swiglu_forward_kernel": "swiglu forward",
    "_swiglu_backward_kernel": "swiglu backward",
}


@functools.cache
def _known() -> dict[str, Decoded]:
    """Kernel and op names whose origin is known: Liger's and fusedmlp's (declared by each kernel
    file and op file as its PROFILES)."""
    from ..kernels import profiles
    from ..ops import PROFILES as op_profiles

    known = {n: Decoded(library="Triton (Liger)", kind=ELEMENTWISE, op=op) for n, op in _LIGER_TRITON.items()}
    for p in profiles():
        kind = GEMM if p.gemm else ELEMENTWISE
        known[p.name] = Decoded(library=f"Triton ({p.library})", kind=kind, op=p.op)
    for p in op_profiles:
        ns, _, op = p.name.partition("::")
        known[p.name] = Decoded(library=f"custom op ({ns})", kind=GEMM if p.gemm else "custom", op=op)
    return known


def _user_triton(name: str, launched_by_driver: bool) -> Decoded | None:
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        return None
    if name.endswith("kernel") or launched_by_driver:
        words = name.strip("_").removesuffix("kernel").strip("_").replace("_", " ")
        return Decoded(library="Triton (user)", kind="triton", op=words or None)
    return None


def _snake(camel: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", camel).lower()


_ATEN_DTYPES = {
    "c10::BFloat16": "bf16",
    "c10::Half": "fp16",
    "float": "fp32",
    "double": "fp64",
    "c10::Float8_e4m3fn": "e4m3",
}
_GENERIC_FUNCTORS = {"Binary", "AUnary", "BUnary", "Unary", "Fill"}


def _aten_cuda(name: str) -> Decoded | None:
    if "at::native" not in name and "at::cuda" not in name:
        return None
    if "reduce_kernel" in name:
        kind = REDUCTION
    elif "elementwise_kernel" in name:
        kind = ELEMENTWISE
    else:
        kind = "aten"
    op = None
    # The op sits in the functor or lambda's owner: GeluCUDAKernelImpl, MulFunctor, silu_kernel(...
    for pattern in (
        r"at::native::(\w+?)CUDAKernelImpl",
        r"binary_internal::(\w+?)Functor",
        r"CUDAFunctor(?:OnSelf|OnOther)?_(\w+)",
        r"at::native::(?:\(anonymous namespace\)::)?(\w+?)_kernel(?:_cuda|_impl)?\(",
        r"at::native::(\w+?)Functor",
        r"(?<!\w)(\w+?)_functor",  # from a word's start only: else retried at every position
        r"at::native::(?:\(anonymous namespace\)::)?(\w+?)_kernel",
    ):
        for m in re.finditer(pattern, name):
            if m[1] not in _GENERIC_FUNCTORS and not m[1].endswith("elementwise"):
                op = _snake(m[1])
                break
        if op:
            break
    if op is None and "FillFunctor" in name:
        op = "fill"
    dtype = next((v for k, v in _ATEN_DTYPES.items() if k in name), None)
    variant = None
    if m := re.search(r"vectorized_elementwise_kernel<(\d+)", name):
        variant = f"vectorized x{m[1]}"
    return Decoded(library="ATen", kind=kind, op=op, dtype=dtype, variant=variant)


# CPU ops (traces without a GPU) that are work, and the ones that never are.
_CPU_GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation", "mkldnn_linear"}
VIEW_OPS = frozenset(
    "aten::" + o
    for o in [
        "t",
        "transpose",
        "view",
        "reshape",
        "_unsafe_view",
        "_reshape_alias",
        "as_strided",
        "expand",
        "expand_as",
        "permute",
        "squeeze",
        "unsqueeze",
        "slice",
        "select",
        "narrow",
        "split",
        "chunk",
        "unbind",
        "split_with_sizes",
        "detach",
        "alias",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "set_",
        "lift_fresh",
        "contiguous",
        "numpy_T",
        "flatten",
        "unflatten",
        "view_as",
        "result_type",
        "is_nonzero",
        "size",
        "stride",
        "to",  # a no-op when dtype and device already match; when not, its aten::_to_copy is the work
        "detach_",
    ]
)


def _cpu_op(name: str) -> Decoded | None:
    m = re.fullmatch(r"(\w+)::(\w+)(?:\.\w+)?", name)
    if m is None:
        return None
    ns, op = m[1], m[2]
    if ns == "aten":
        kind = GEMM if op in _CPU_GEMM_OPS else ("view" if name in VIEW_OPS else "aten")
        return Decoded(library="ATen (CPU op)", kind=kind, op=op)
    return Decoded(library=f"custom op ({ns})", kind="custom", op=op)


def _copy(name: str) -> Decoded | None:
    if m := re.match(r"Memcpy (\w+)", name):
        return Decoded(library="CUDA runtime", kind=MEMCPY, variant=m[1])
    if name.startswith("Memset"):
        return Decoded(library="CUDA runtime", kind=MEMSET)
    return None


def _misc(name: str) -> Decoded | None:
    if name.startswith("ncclDevKernel") or name.startswith("ncclKernel"):
        return Decoded(library="NCCL", kind="collective", op=name.split("_")[1] if "_" in name else None)
    if "flash" in name.lower() and "kernel" in name.lower():
        return Decoded(library="flash-attention", kind="attention")
    if "splitKreduce" in name:
        return Decoded(library="cuBLAS", kind=REDUCTION, op="split-k reduce")
    if re.search(r"gemv|gemmSN|gemmk1", name):
        return Decoded(library="cuBLAS", kind=GEMM, op="gemv" if "gemv" in name else None)
    return None


def decode(name: str, launched_by_driver: bool = False) -> Decoded:
    """Decode a kernel (or CPU op) name. ``launched_by_driver``: the trace shows it launched by
    cuLaunchKernel(Ex), as Triton launches, which marks an otherwise anonymous name as Triton.
    Never raises; names longer than MAX_NAME_CHARS are decoded from their first MAX_NAME_CHARS."""
    if not isinstance(name, str):
        return Decoded(library=UNKNOWN, kind=UNKNOWN)
    return _decode(name[:MAX_NAME_CHARS].strip(), bool(launched_by_driver))


@functools.lru_cache(maxsize=4096)
def _decode(name: str, launched_by_driver: bool) -> Decoded:
    if not name:
        return Decoded(library=UNKNOWN, kind=UNKNOWN)
    known = _known()
    if name in known:  # before the name heuristics: "_gemm_act_kernel" is not cuBLAS
        return known[name]
    if (op := re.fullmatch(r"(\w+::\w+)\.\w+", name)) and op[1] in known:  # fusedmlp::mlp.default
        return known[op[1]]
    for decoder in (_copy, _nvjet, _inductor, _aten_cuda, _cpu_op, _misc, _cublas_family):
        found = decoder(name)
        if found is not None:
            return found
    return _user_triton(name, launched_by_driver) or Decoded(library=UNKNOWN, kind=UNKNOWN)
