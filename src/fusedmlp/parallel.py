"""The fused MLPs under PyTorch's own distributed stack: tensor and sequence parallel (DTensor,
``parallelize_module``), FSDP2 (``fully_shard``), torch.distributed.checkpoint. No distribution
layer of our own: placements, collectives and checkpoints are torch's.

Layout. A gated module stores gate|up as ONE [2, H, D] parameter (modules/mlp.py). Tensor
parallel shards it on dim 1, so each rank holds exactly [gate_r; up_r] (its local [2, H/n, D]
viewed as [2H/n, D] is what the kernels take) and the matching columns of the output
projection (Shard(1) of [D, H]); a plain MLP shards fc1 by rows and fc2 by columns. That is
Megatron's column-then-row split: each rank runs the whole fused MLP on its shards and the
partial outputs meet in ONE all-reduce (a reduce-scatter along the sequence with
``sequence_parallel=True``, whose input is all-gathered first); the input gradient takes one
all-reduce (reduce-scatter) in the backward. The output bias is added once, after the reduce.

The state_dict shows gate and up as views of the [2, H, D] parameter (unbind along dim 0, a
local op on every placement used here): ``state_dict()`` runs no collective, its keys and
placements are those of the unfused module under the matching plan (ColwiseParallel on
gate/up, RowwiseParallel on down; FSDP2's Shard(0) of each [H, D] projection when
:func:`fsdp_shard_placement` shards the [2, H, D] parameter on dim 1), and DCP checkpoints
cross-load with the unfused model's.

Dropout of h under tensor parallel: each rank draws the seed from its own generator and takes
its columns of the whole h's mask, so ranks seeded alike (as tensor-parallel ranks are) drop
exactly what the unsharded module drops with that seed.

A model sharded before it was fused (torch's ColwiseParallel/RowwiseParallel, Hugging Face's
"colwise"/"rowwise"): ``fusedmlp.fuse`` takes it as it is (fuse/sharded.py). Hugging Face plans
that shard fused modules name the style :func:`register_hf_tp_style` registers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from . import functional
from .modules.experts import FusedGatedExperts
from .modules.mlp import FusedGatedMLP, FusedMLP, _FusedMLPBase, _merged_rows
from .modules.state import load_state_dict_hook, source_named_tensors
from .ops.experts import experts


@dataclasses.dataclass(frozen=True)
class _TensorParallel:
    mesh: DeviceMesh
    sequence_parallel: bool
    sequence_dim: int
    use_local_output: bool


def tp_placements(module: _FusedMLPBase) -> dict[str, Placement]:
    """The tensor-parallel placement of each parameter of a fused MLP."""
    shard_in = Shard(1) if module.GATED else Shard(0)  # the H dimension of [2, H, D] / [H, D]
    return {"in_weight": shard_in, "in_bias": shard_in, "out_weight": Shard(1), "out_bias": Replicate()}


class FusedMLPParallel(ParallelStyle):
    """Tensor parallel (optionally sequence parallel) for :class:`FusedGatedMLP` and
    :class:`FusedMLP`, as a ParallelStyle: use it in ``parallelize_module`` plans (and
    torchtitan-style plans) where an unfused MLP would take ColwiseParallel on gate/up and
    RowwiseParallel on down, e.g. ``{"layers.*.mlp": FusedMLPParallel()}``.

    ``sequence_parallel``: the input arrives sharded along ``sequence_dim`` (as a DTensor or as
    the local shard) and the output leaves sharded the same way (reduce-scatter instead of
    all-reduce). ``use_local_output``: return the local tensor (default) rather than a DTensor.
    """

    def __init__(
        self, *, sequence_parallel: bool = False, sequence_dim: int = 1, use_local_output: bool = True
    ) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, (FusedGatedMLP, FusedMLP)):
            raise TypeError(
                f"FusedMLPParallel shards FusedGatedMLP and FusedMLP modules, got {type(module).__name__}; "
                "fuse the model first (fusedmlp.fuse), or shard its own Linears with torch's styles"
            )
        if device_mesh.ndim != 1:
            raise ValueError(
                f"FusedMLPParallel takes a 1-D mesh (the tensor-parallel one), got {device_mesh.ndim}-D"
            )
        for name, placement in tp_placements(module).items():
            param = module._parameters.get(name)
            if param is None:
                continue
            if isinstance(param, DTensor):
                raise ValueError(f"{name} is already sharded ({param.placements}); apply the plan once")
            sharded = distribute_tensor(
                param.detach(), device_mesh, [placement], src_data_rank=self.src_data_rank
            )
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module._tensor_parallel = _TensorParallel(
            device_mesh, self.sequence_parallel, self.sequence_dim, self.use_local_output
        )
        return module


def register_hf_tp_style(
    name: str = "fusedmlp", *, sequence_parallel: bool = False, sequence_dim: int = 1
) -> str:
    """Make :class:`FusedMLPParallel` a Hugging Face tensor-parallel style named ``name``, for
    ``tp_plan`` entries on fused MLP modules (transformers 5's ``ALL_PARALLEL_STYLES``), e.g.
    ``apply_tensor_parallelism(model, mesh, {"model.layers.0.mlp": "fusedmlp"})`` after
    ``fusedmlp.fuse(model)``. As Hugging Face's own styles, every rank keeps its own chunk of the
    weights it loaded (no broadcast). (A model Hugging Face already sharded with its "colwise" /
    "rowwise" plan needs no style: ``fusedmlp.fuse`` takes it as it is.) Returns ``name``."""
    try:
        from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
    except ImportError as e:
        raise ImportError(
            f"register_hf_tp_style needs transformers 5 with DTensor tensor parallel ({e}); "
            "with torch's parallelize_module use FusedMLPParallel directly"
        ) from None
    style = FusedMLPParallel(sequence_parallel=sequence_parallel, sequence_dim=sequence_dim)
    style.src_data_rank = None

    class FusedMLPStyle(TensorParallelLayer):  # type: ignore[misc, valid-type]
        """Shards a fused MLP module when its tp_plan entry is installed; parameter entries
        are no-ops (the module entry shards them all)."""

        def install_forward(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            return style._apply(module, mesh)

    ALL_PARALLEL_STYLES.register(name, FusedMLPStyle())
    return name


class _SumPartials(torch.autograd.Function):
    """The row-parallel output: forward sums the ranks' partial outputs (all-reduce; with
    sequence parallel a reduce-scatter along the sequence), backward gives every rank the
    gradient of the whole (identity; all-gather). torch's functional collectives return fresh
    tensors, so the output may be modified in place (a residual ``y += x``) as eager's can."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, mesh: DeviceMesh, seq_dim: int | None) -> Tensor:
        ctx.mesh, ctx.seq_dim = mesh, seq_dim
        if seq_dim is None:
            return funcol.wait_tensor(funcol.all_reduce(y, "sum", mesh))
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(y.contiguous(), "sum", seq_dim, mesh))

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        if ctx.seq_dim is None:
            return dy, None, None
        dy_all = funcol.all_gather_tensor(dy.contiguous(), ctx.seq_dim, ctx.mesh)
        return funcol.wait_tensor(dy_all), None, None


class _ToAllRanks(torch.autograd.Function):
    """The column-parallel input: forward hands every rank the whole input (identity; with
    sequence parallel an all-gather of the sequence shards), backward sums the ranks' partial
    input gradients (all-reduce; reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mesh: DeviceMesh, seq_dim: int | None) -> Tensor:
        ctx.mesh, ctx.seq_dim = mesh, seq_dim
        if seq_dim is None:
            return x.view_as(x)
        return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), seq_dim, mesh))

    @staticmethod
    def backward(ctx: Any, dx: Tensor) -> tuple[Tensor, None, None]:
        if ctx.seq_dim is None:
            return funcol.wait_tensor(funcol.all_reduce(dx, "sum", ctx.mesh)), None, None
        dx_part = funcol.reduce_scatter_tensor(dx.contiguous(), "sum", ctx.seq_dim, ctx.mesh)
        return funcol.wait_tensor(dx_part), None, None


def _shard_offset(size: int, mesh: DeviceMesh) -> int:
    """The first index of this rank's Shard of a dimension of ``size`` (torch.chunk's split, as
    DTensor's Shard places it)."""
    chunk = -(-size // mesh.size())
    return min(mesh.get_local_rank() * chunk, size)


def tensor_parallel_forward(module: _FusedMLPBase, x: Tensor) -> Tensor:
    """The forward of a fused MLP whose parameters :class:`FusedMLPParallel` sharded: the fused
    op on the local shards, between the two collectives of the column-then-row split."""
    tp: _TensorParallel | None = getattr(module, "_tensor_parallel", None)
    if tp is None:
        raise RuntimeError(
            f"{type(module).__name__}'s parameters are DTensors but were not sharded by "
            "fusedmlp.parallel.FusedMLPParallel; shard fused MLPs with that style"
        )
    mesh = tp.mesh
    seq_dim = tp.sequence_dim % max(x.dim(), 1) if tp.sequence_parallel else None
    if isinstance(x, DTensor):  # from a layer that keeps DTensors: this rank's part of it
        x = x.redistribute(mesh, [Replicate()] if seq_dim is None else [Shard(seq_dim)]).to_local()
    x_all = _ToAllRanks.apply(x, mesh, seq_dim)
    p = module._parameters
    local = [t.to_local() if isinstance(t, DTensor) else t for t in (p["in_weight"], p.get("in_bias"))]
    w_in, b_in, w_out = local[0], local[1], p["out_weight"].to_local()  # type: ignore[union-attr]
    if module.GATED:
        w_in, b_in = _merged_rows(w_in, b_in)  # [gate_r; up_r]
    names = ("in_weight", "in_bias", "out_weight", "out_bias")
    functional.check_mlp(x_all, w_in, b_in, w_out, None, module.GATED, names)
    p_drop = module.hidden_dropout if module.training else 0.0
    act, gated, level = module.activation, module.GATED, module.recompute
    # dropout of h: this rank's columns of the unsharded h's mask (the ranks seeded alike)
    span = (_shard_offset(module.intermediate_size, mesh), module.intermediate_size) if p_drop else None
    y = functional.run_mlp(x_all, w_in, b_in, w_out, None, act, gated, level, p_drop, span)
    y = _SumPartials.apply(y, mesh, seq_dim)
    b_out = p.get("out_bias")
    if b_out is not None:  # once, after the sum; a sequence shard's rows give a partial gradient
        if isinstance(b_out, DTensor):
            b_out = b_out.to_local(grad_placements=None if seq_dim is None else [Partial()])
        y = y + b_out
    if tp.use_local_output:
        return y
    placement = Replicate() if seq_dim is None else Shard(seq_dim)
    return DTensor.from_local(y, mesh, [placement], run_check=False)


class ExpertsParallel(ParallelStyle):
    """Expert parallel for :class:`FusedGatedExperts`: each rank holds E/n whole experts
    (Shard(0) of ``gate_up`` [E, 2, H, D], ``down`` [E, D, H] and their biases). Every rank sees
    all tokens (as they leave a replicated attention block), runs its own experts on the tokens
    routed to them (indices of other ranks' experts contribute nothing, as Hugging Face's
    expert-parallel masking does), and the partial outputs meet in one all-reduce; the backward
    sums the tokens' and routing weights' gradients across ranks (one all-reduce each)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, FusedGatedExperts):
            raise TypeError(f"ExpertsParallel shards FusedGatedExperts modules, got {type(module).__name__}")
        if device_mesh.ndim != 1 or module.num_experts % device_mesh.size():
            raise ValueError(
                f"ExpertsParallel needs a 1-D mesh whose size divides the {module.num_experts} experts, "
                f"got {device_mesh.ndim}-D of size {device_mesh.size()}"
            )
        for name in ("gate_up", "gate_up_bias", "down", "down_bias"):
            param = module._parameters.get(name)
            if param is None:
                continue
            sharded = distribute_tensor(
                param.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
            )
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module._expert_parallel = device_mesh
        return module


def expert_parallel_forward(module: FusedGatedExperts, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """The forward of experts sharded by :class:`ExpertsParallel` (see there)."""
    mesh: DeviceMesh | None = getattr(module, "_expert_parallel", None)
    if mesh is None:
        raise RuntimeError(
            "FusedGatedExperts' parameters are DTensors but were not sharded by "
            "fusedmlp.parallel.ExpertsParallel; shard experts with that style"
        )
    p = module._parameters
    local = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in p.items()}
    n_local = local["gate_up"].shape[0]  # type: ignore[union-attr]
    start = mesh.get_local_rank() * n_local
    mine = index - start
    mine = torch.where((mine >= 0) & (mine < n_local), mine, n_local)  # others' experts: no contribution
    x_all = _ToAllRanks.apply(x, mesh, None)
    w_all = _ToAllRanks.apply(weights, mesh, None)
    y = experts(x_all, mine, w_all, local["gate_up"], local.get("gate_up_bias"), local["down"],  # type: ignore[arg-type]
                local.get("down_bias"), module.act, module.recompute)
    return _SumPartials.apply(y, mesh, None)


def fsdp_shard_placement(model: nn.Module) -> Callable[[nn.Parameter], Shard | None]:
    """A ``shard_placement_fn`` for ``fully_shard``: the gate|up parameters of gated fused MLPs
    ([2, H, D] and [2, H]) shard on dim 1 (H), so that every rank's shard of gate and of up is the
    Shard(0) FSDP2 gives the unfused [H, D] projections (state_dict views need no collective,
    checkpoints match the unfused run's); every other parameter keeps FSDP2's default.
    Build it after tensor parallel (which replaces the parameters) for 2-D meshes::

        fully_shard(block, mesh=dp_mesh, shard_placement_fn=fsdp_shard_placement(model))
    """
    gate_up = {
        id(p)
        for m in model.modules()
        if isinstance(m, FusedGatedMLP)
        for p in (m.in_weight, m.in_bias)
        if p is not None
    }
    return lambda param: Shard(1) if id(param) in gate_up else None


# ---------------------------------------------------------------------------------------------
# optimizer state between the fused and the unfused layouts
# ---------------------------------------------------------------------------------------------


def _fused_parameters(model: nn.Module) -> dict[str, tuple[_FusedMLPBase, str, str]]:
    """Name of each fused-MLP parameter in ``model`` -> (its module, the module's prefix, own name)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, _FusedMLPBase):
            prefix = f"{path}." if path else ""
            for own, p in m._parameters.items():
                if p is not None:
                    out[prefix + own] = (m, prefix, own)
    return out


def _source_names(module: _FusedMLPBase, own: str) -> list[str]:
    return list(source_named_tensors(module, {own: module._parameters[own]}))  # type: ignore[dict-item]


def optimizer_state_to_source(model: nn.Module, osd: dict[str, Any]) -> dict[str, Any]:
    """A fused model's optimizer state dict, as ``get_optimizer_state_dict`` gives it (``state``
    and ``param_groups`` keyed by parameter name), converted to the unfused model's names: each
    state tensor shaped like a fused parameter is split as the state_dict splits the parameter
    (gate|up into gate and up, views); other entries (``step``) go to every piece. The result
    loads into the unfused model with ``set_optimizer_state_dict``."""
    fused = _fused_parameters(model)
    state: dict[str, Any] = {}
    renames: dict[str, list[str]] = {}
    for fqn, per_param in osd["state"].items():
        if fqn not in fused:
            state[fqn] = per_param
            continue
        module, prefix, own = fused[fqn]
        shape = module._parameters[own].shape  # type: ignore[union-attr]
        names = _source_names(module, own)
        renames[fqn] = [prefix + n for n in names]
        for n in names:
            state[prefix + n] = {}
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.shape == shape:
                for n, piece in source_named_tensors(module, {own: value}).items():
                    state[prefix + n][key] = piece
            else:
                for n in names:
                    state[prefix + n][key] = value
    groups = [
        {**g, "params": [n for fqn in g["params"] for n in renames.get(fqn, [fqn])]}
        for g in osd["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def optimizer_state_from_source(model: nn.Module, osd: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_source`: an unfused run's optimizer state dict
    (parameter names as keys) merged into ``model``'s fused parameter names."""
    state = dict(osd["state"])
    renames: dict[str, str] = {}
    for fqn, (module, prefix, own) in _fused_parameters(model).items():
        keys = [prefix + n for n in _source_names(module, own)]
        if not all(k in state for k in keys):
            continue
        merged: dict[str, Any] = {}
        for key, value in state[keys[0]].items():
            if isinstance(value, Tensor) and value.dim() > 0:
                pieces = {k.removeprefix(prefix): state[k][key] for k in keys}
                load_state_dict_hook(module, pieces, "")
                merged[key] = pieces[own]
            else:
                merged[key] = value
        for k in keys:
            del state[k]
            renames[k] = fqn
        state[fqn] = merged
    groups = []
    for g in osd["param_groups"]:
        params = list(dict.fromkeys(renames.get(n, n) for n in g["params"]))
        groups.append({**g, "params": params})
    return {"state": state, "param_groups": groups}


def reject_dtensors(*tensors: Tensor | None, op: str) -> None:
    """A clear error where a functional op is handed DTensors: it computes on local tensors."""
    if any(isinstance(t, DTensor) for t in tensors):
        raise TypeError(
            f"fusedmlp.functional.{op} takes local tensors, got a DTensor: shard fused modules with "
            "fusedmlp.parallel.FusedMLPParallel (tensor parallel) or fully_shard (FSDP2), or pass "
            "t.to_local() / t.full_tensor()"
        )
