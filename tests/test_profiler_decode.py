"""Kernel-name decoder: exact fields for the names seen on the H100 and the other families."""

import pytest
from synthetic_traces import GELU, MUL

from fusedmlp.profiler.decode import decode, split_fused_ops


def test_nvjet_gemm():
    assert decode("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT").as_dict() == {
        "library": "cuBLAS (nvjet)",
        "kind": "gemm",
        "arch": "sm90",
        "tile": "256x128",
        "k_tile": 64,
        "stages": 4,
        "cluster": "1x2",
        "layout": "TNT",
        "variant": "coopA",
        "flags": ["tst", "h", "bz"],
    }


def test_nvjet_bias_epilogue():
    d = decode("nvjet_sm90_tst_8x64_64x16_2x1_v_bz_bias_TNN")
    assert (d.library, d.kind, d.tile, d.k_tile, d.stages, d.cluster, d.layout, d.epilogue, d.variant) == (
        "cuBLAS (nvjet)",
        "gemm",
        "8x64",
        64,
        16,
        "2x1",
        "TNN",
        "bias",
        None,
    )
    assert d.is_gemm


def test_nvjet_without_arch():
    d = decode("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NNN")
    assert (d.arch, d.tile, d.cluster, d.layout, d.variant) == (None, "128x256", "2x1", "NNN", "coopB")


def test_xmma_gemm():
    d = decode(
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize2x1x1_"
        "execute_segment_k_off_kernel__5x_cublas"
    )
    assert d.as_dict() == {
        "library": "cuBLAS (xmma)",
        "kind": "gemm",
        "arch": "sm90",
        "tile": "128x128",
        "k_tile": 64,
        "layout": "TNN",
        "dtype": "bf16bf16_bf16f32_f32",
        "variant": "warpgroups 2x1x1",
    }


def test_ampere_gemm():
    d = decode("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn")
    assert d.as_dict() == {
        "library": "cuBLAS",
        "kind": "gemm",
        "arch": "sm80",
        "tile": "128x128",
        "k_tile": 64,
        "stages": 3,
        "layout": "TN",
        "dtype": "bf16",
    }


def test_simt_sgemm():
    d = decode("ampere_sgemm_128x64_tn")
    assert (d.library, d.arch, d.tile, d.layout, d.dtype) == ("cuBLAS", "sm80", "128x64", "TN", "fp32")


def test_cutlass_wrapped_gemm_with_relu_epilogue():
    name = (
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x10_tn_align8>"
        "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x10_tn_align8::Params)"
    )
    d = decode(name)
    assert (d.library, d.arch, d.tile, d.k_tile, d.stages, d.layout, d.epilogue) == (
        "CUTLASS",
        "sm80",
        "64x64",
        32,
        10,
        "TN",
        "relu",
    )


@pytest.mark.parametrize(
    "name, kind, ops",
    [
        ("triton_poi_fused__unsafe_view_gelu_mul_0", "pointwise", ["_unsafe_view", "gelu", "mul"]),
        (
            "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1",
            "reduction",
            ["_to_copy", "add", "mean", "mul", "pow", "rsqrt"],
        ),
        ("triton_per_fused_native_layer_norm_3", "persistent-reduction", ["native_layer_norm"]),
        ("triton_tem_fused_addmm_gelu_0", "template", ["addmm", "gelu"]),
    ],
)
def test_inductor(name, kind, ops):
    d = decode(name)
    assert (d.library, d.kind, list(d.ops)) == ("Triton (Inductor)", kind, ops)
    assert d.is_gemm == (kind == "template")


def test_split_fused_ops_keeps_leading_underscores():
    assert split_fused_ops("_unsafe_view_gelu_mul") == ("_unsafe_view", "gelu", "mul")
    assert split_fused_ops("mul_silu") == ("mul", "silu")


@pytest.mark.parametrize(
    "name, library, op",
    [
        ("_act_fwd_kernel", "Triton (fusedmlp)", "(gated) activation forward"),
        ("_geglu_tanh_forward_kernel", "Triton (Liger)", "geglu (tanh) forward"),
        ("my_fancy_kernel", "Triton (user)", "my fancy"),
    ],
)
def test_user_triton(name, library, op):
    d = decode(name)
    assert (d.library, d.op) == (library, op)


def test_anonymous_identifier_is_triton_only_when_launched_by_the_driver():
    assert decode("fused_thing").library == "unknown"
    assert decode("fused_thing", launched_by_driver=True).library == "Triton (user)"


@pytest.mark.parametrize("name, op", [(GELU, "gelu"), (MUL, "mul")])
def test_aten_elementwise(name, op):
    assert decode(name).as_dict() == {
        "library": "ATen",
        "kind": "elementwise",
        "op": op,
        "dtype": "bf16",
        "variant": "vectorized x4",
    }


def test_aten_silu_and_fill():
    silu = (
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel("
        "at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda(c10::BFloat16)#1}, "
        "std::array<char*, 2ul> >(int, ...)"
    )
    fill = (
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
        "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)"
    )
    assert decode(silu).op == "silu"
    assert (decode(fill).op, decode(fill).dtype) == ("fill", "fp32")


def test_copies_and_cpu_ops():
    assert decode("Memcpy DtoD (Device -> Device)").as_dict() == {
        "library": "CUDA runtime",
        "kind": "memcpy",
        "variant": "DtoD",
    }
    assert decode("Memset (Device)").kind == "memset"
    assert (decode("aten::mm").kind, decode("aten::t").kind, decode("aten::gelu").kind) == (
        "gemm",
        "view",
        "aten",
    )
    assert decode("fusedmlp::gated_act").library == "custom op (fusedmlp)"
    assert decode("graph_0_cpp_fused_gelu_mul_0").ops == ("gelu", "mul")


@pytest.mark.parametrize(
    "name",
    ["", "   ", "hello world", "nvjet_", "nvjet_sm90_tst_axb", "x" * 10_000, "void (*)()", "💥", "triton_"],
)
def test_unknown_names_decode_as_unknown_and_never_raise(name):
    d = decode(name)
    assert (d.library, d.kind) == ("unknown", "unknown")
    assert d.summary()  # and it still prints


def test_summary_reads_well():
    s = decode("nvjet_sm90_tst_8x64_64x16_2x1_v_bz_bias_TNN").summary()
    assert s == "cuBLAS (nvjet) gemm sm90 tile 8x64 k64 stages 16 cluster 2x1 TNN epilogue bias"
