"""Scale-out through PyTorch's own stack, on the CPU with gloo in spawned processes (fp32, the
torch path of the ops; the same code runs the kernels on GPUs): tensor parallel, sequence
parallel, FSDP2 and their 2-D composition against unsharded eager over 3 AdamW steps; local
shards equal [gate_r; up_r]; state_dict keys, placements and DCP checkpoints equal the unfused
module's, with no collective in state_dict(); one all-reduce per block forward and backward
under tensor parallel; checkpoints cross-load between fused and unfused, plain and sharded."""

import datetime
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
D, H, STEPS = 16, 24, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, world: int) -> None:
    """Run ``worker(rank, world, tmpdir)`` in ``world`` spawned processes; re-raise a failure."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        errors = os.path.join(tmp, "errors")
        os.makedirs(errors)
        mp.spawn(_entry, args=(worker, world, port, tmp), nprocs=world, join=True)
        failures = []
        for name in sorted(os.listdir(errors)):
            with open(os.path.join(errors, name)) as f:
                failures.append(f.read())
        assert not failures, "\n".join(failures)


def _entry(rank, worker, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank that fails leaves the others in a collective: bounded, so CI cannot hang
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    torch.set_num_threads(1)
    try:
        worker(rank, world, tmp)
        dist.barrier()  # no rank tears the group down while another is still in a collective
    except BaseException:
        with open(os.path.join(tmp, "errors", f"rank{rank}"), "w") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


class Block(nn.Module):
    """A transformer-ish block: a norm, then the MLP with an in-place residual (y += x), which
    fused modules support under every plan (torch's RowwiseParallel returns a view, on which the
    unfused reference needs ``inplace=False``)."""

    def __init__(self, mlp: nn.Module, inplace: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = mlp
        self.inplace = inplace

    def forward(self, x):
        y = self.mlp(self.norm(x))
        if self.inplace:
            y += x
            return y
        return y + x


def _models(seed: int = 0):
    """(eager, fused) pairs of a 2-block model: a gated and a plain MLP, with biases."""
    from fusedmlp import FusedGatedMLP, FusedMLP
    from fusedmlp.reference import MLP, GatedMLP

    torch.manual_seed(seed)
    eager = nn.Sequential(Block(GatedMLP(D, H, "silu", bias=True)), Block(MLP(D, H, "gelu_tanh")))
    fused = nn.Sequential(
        Block(FusedGatedMLP.from_module(eager[0].mlp)), Block(FusedMLP.from_module(eager[1].mlp))
    )
    for f, e in zip(fused, eager, strict=True):
        f.norm.load_state_dict(e.norm.state_dict())
    return eager, fused


def _train(model, xs, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    outs = []
    for x in xs:
        y = model(x)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
    return outs, opt


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _close(a, b, what):
    torch.testing.assert_close(_full(a), _full(b), rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _tp_copy(unfused, ref):
    """``unfused`` (already sharded) holding ``ref``'s weights (torch's sharded modules take a
    full state_dict through set_model_state_dict; fused ones through load_state_dict too)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(unfused, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    return unfused


def _dcp_matrix(tmp, sharded: dict, ref) -> None:
    """Every sharded model saves a DCP checkpoint; every model (those, and plain fused and
    unfused ones) loads every checkpoint in place and then holds ``ref``'s weights."""
    import torch.distributed.checkpoint as dcp

    paths = {}
    for name, model in sharded.items():
        paths[name] = os.path.join(tmp, name.replace(" ", "_"))
        dcp.save(model.state_dict(), checkpoint_id=paths[name])
    dist.barrier()
    # a fused model's checkpoint is the unfused one's: keys, sizes, dtypes and chunks
    for name, path in paths.items():
        twin = paths.get(f"un{name}")
        if twin is not None:
            fused_md, unfused_md = (
                dcp.FileSystemReader(p).read_metadata().state_dict_metadata for p in (path, twin)
            )
            assert fused_md == unfused_md, f"DCP metadata of {name} differs from un{name}'s"
    targets = dict(sharded)
    targets["plain unfused"], targets["plain fused"] = _models(seed=11)
    for src, path in paths.items():
        for name, model in targets.items():
            with torch.no_grad():
                for p in model.parameters():  # garbage first: the load must overwrite every value
                    p.fill_(0.25)
            dcp.load(model.state_dict(), checkpoint_id=path)  # in place: views land in the module
            for k, v in model.state_dict().items():
                _close(v, ref.state_dict()[k], f"DCP {src} -> {name}: {k}")


def _tp_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    from fusedmlp.parallel import FusedMLPParallel

    mesh = init_device_mesh("cpu", (world,))
    eager, fused = _models()
    ref_eager, _ = _models()
    torch.manual_seed(1)
    xs = [torch.randn(2, 5, D) for _ in range(STEPS)]
    parallelize_module(fused, mesh, {"0.mlp": FusedMLPParallel(), "1.mlp": FusedMLPParallel()})

    # the local shard of gate|up is exactly [gate_r; up_r]
    w = fused[0].mlp.in_weight
    assert isinstance(w, DTensor) and w.placements[0].dim == 1
    rows = torch.tensor_split(torch.arange(H), world)[rank]
    local = w.to_local()
    assert torch.equal(local[0], eager[0].mlp.gate_proj.weight[rows]) and torch.equal(
        local[1], eager[0].mlp.up_proj.weight[rows]
    )

    # state_dict: keys and placements of the unfused module under Colwise/Rowwise, no collective
    unfused = _models()[0]
    parallelize_module(unfused, mesh, _torch_plan())
    with CommDebugMode() as comm:
        sd = fused.state_dict()
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    usd = unfused.state_dict()
    assert list(sd) == list(usd)
    for k in sd:
        a, b = sd[k], usd[k]
        assert isinstance(a, DTensor) == isinstance(b, DTensor), k
        if isinstance(a, DTensor):
            assert a.placements == b.placements and a.shape == b.shape, (k, a.placements, b.placements)
            assert torch.equal(a.to_local(), b.to_local()), k

    # one all-reduce per block forward, one per block backward (the input gradient); the MLPs
    # alone (CommDebugMode's module hooks forbid the blocks' in-place residual)
    for block in fused:
        x = xs[0].clone().requires_grad_()
        with CommDebugMode() as comm:
            y = block.mlp(x)
        counts = {str(k): v for k, v in comm.get_comm_counts().items()}
        assert sum(counts.values()) == 1 and all("all_reduce" in k for k in counts), counts
        with CommDebugMode() as comm:
            y.sum().backward()
        counts = {str(k): v for k, v in comm.get_comm_counts().items()}
        assert sum(counts.values()) == 1 and all("all_reduce" in k for k in counts), counts
    fused.zero_grad()

    # 3 AdamW steps against unsharded eager
    got, _ = _train(fused, xs)
    want, _ = _train(ref_eager, xs)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        _close(a, b, f"TP output, step {i}")
    for k, v in fused.state_dict().items():
        _close(v, ref_eager.state_dict()[k], f"TP {k} after {STEPS} steps")

    # a full (Hugging Face style) state_dict of plain tensors loads into the TP model, locally
    _, fresh = _models(seed=3)
    parallelize_module(fresh, mesh, {"0.mlp": FusedMLPParallel(), "1.mlp": FusedMLPParallel()})
    with CommDebugMode() as comm:
        fresh.load_state_dict(ref_eager.state_dict())
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    _close(fresh(xs[0]), ref_eager(xs[0]), "TP model from a full state_dict")

    # DCP: {fused, unfused} x {TP, plain}, saved by one, loaded by every other
    _dcp_matrix(tmp, {"fused TP": fused, "unfused TP": _tp_copy(unfused, ref_eager)}, ref_eager)


def _torch_plan(sequence_parallel: bool = False):
    """torch's own plan for the unfused model: ColwiseParallel on the input projections,
    RowwiseParallel on the output ones (with sequence-parallel layouts along dim 1)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col = ColwiseParallel(input_layouts=Shard(1)) if sequence_parallel else ColwiseParallel()
    row = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
    plan = {n: col for n in ("0.mlp.gate_proj", "0.mlp.up_proj", "1.mlp.fc1")}
    return plan | {"0.mlp.down_proj": row, "1.mlp.fc2": row}


def _fuse_sharded_worker(rank, world, tmp):
    """fuse on a model torch's tensor parallel already sharded: the fused blocks take the same
    local shards (stacked), keep the state_dict, and train like unsharded eager; the sequence-
    parallel layouts are recognised; a layout FusedMLPParallel does not run is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    import fusedmlp
    from fusedmlp import FusedGatedMLP, FusedMLP

    mesh = init_device_mesh("cpu", (world,))
    eager, _ = _models()
    model, _ = _models()
    parallelize_module(model, mesh, _torch_plan())
    before = {
        k: (type(v), v.placements, v.to_local().clone())
        for k, v in model.state_dict().items()
        if isinstance(v, DTensor)
    }
    keys = list(model.state_dict())
    report = fusedmlp.fuse(model)
    assert len(report.fused) == 2 and not report.skipped, report
    assert isinstance(model[0].mlp, FusedGatedMLP) and isinstance(model[1].mlp, FusedMLP)
    local = model[0].mlp.in_weight.to_local()  # [gate_r; up_r]: the block's own shards, stacked
    assert torch.equal(local[0], before["0.mlp.gate_proj.weight"][2])
    assert torch.equal(local[1], before["0.mlp.up_proj.weight"][2])
    sd = model.state_dict()
    assert list(sd) == keys
    for k, (_, placements, shard) in before.items():
        assert sd[k].placements == placements and torch.equal(sd[k].to_local(), shard), k
    torch.manual_seed(1)
    xs = [torch.randn(2, 5, D) for _ in range(STEPS)]
    got, _ = _train(model, xs)
    want, _ = _train(eager, xs)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        _close(a, b, f"fused-after-TP output, step {i}")
    for k, v in model.state_dict().items():
        _close(v, eager.state_dict()[k], f"fused-after-TP {k} after {STEPS} steps")

    # sequence-parallel layouts (the norms run on the sequence shard: left out, as in _sp_worker)
    eager, _ = _models()
    model, _ = _models()
    for block in (*eager, *model):
        block.norm = nn.Identity()
    parallelize_module(model, mesh, _torch_plan(sequence_parallel=True))
    report = fusedmlp.fuse(model)
    assert len(report.fused) == 2, report
    assert all(b.mlp._tensor_parallel.sequence_parallel for b in model)
    x = torch.randn(2, 4 * world, D)
    shard = slice(4 * rank, 4 * (rank + 1))
    with torch.no_grad():
        _close(model(x[:, shard].contiguous()), eager(x)[:, shard], "fused-after-SP output")
    # torchtitan's sequence-parallel plan: PrepareModuleInput on the MLP, plain Colwise children
    titan, _ = _models()
    for block in titan:
        block.norm = nn.Identity()
    plan = _torch_plan()
    plan |= {
        f"{i}.mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        for i in (0, 1)
    }
    plan |= {
        "0.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        "1.mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
    }
    parallelize_module(titan, mesh, plan)
    report = fusedmlp.fuse(titan)
    assert len(report.fused) == 2, report
    assert all(b.mlp._tensor_parallel.sequence_parallel for b in titan)
    with torch.no_grad():
        _close(titan(x[:, shard].contiguous()), eager(x)[:, shard], "fused-after-torchtitan-SP output")
    eager, _ = _models()  # the norms back, for what follows

    # Hugging Face's tensor parallel (transformers 5: DTensor weights, patched forwards):
    # sharded by its "colwise"/"rowwise" styles, then fused; and a fused model sharded by a
    # tp_plan entry naming FusedMLPParallel
    try:
        from transformers.integrations.tensor_parallel import apply_tensor_parallelism
    except ImportError:
        apply_tensor_parallelism = None
    if apply_tensor_parallelism is not None:
        from fusedmlp.parallel import register_hf_tp_style

        hf_plan = {}
        for name, style in (
            ("0.mlp.gate_proj", "colwise"),
            ("0.mlp.up_proj", "colwise"),
            ("0.mlp.down_proj", "rowwise"),
            ("1.mlp.fc1", "colwise"),
            ("1.mlp.fc2", "rowwise"),
        ):
            hf_plan |= {f"{name}.weight": style, f"{name}.bias": style, name: style}
        eager, _ = _models()
        hf_sharded, fused = _models()
        apply_tensor_parallelism(hf_sharded, mesh, hf_plan)
        report = fusedmlp.fuse(hf_sharded)
        assert len(report.fused) == 2, report
        apply_tensor_parallelism(fused, mesh, {"0.mlp": register_hf_tp_style(), "1.mlp": "fusedmlp"})
        assert isinstance(fused[0].mlp.in_weight, DTensor)
        want, _ = _train(eager, xs)
        for model in (hf_sharded, fused):
            got, _ = _train(model, xs)
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                _close(a, b, f"Hugging Face TP, step {i}")

    # a layout FusedMLPParallel does not run: the output projection sharded by rows
    model, _ = _models()
    plan = _torch_plan()
    plan["0.mlp.down_proj"] = ColwiseParallel()
    del plan["1.mlp.fc1"], plan["1.mlp.fc2"]
    parallelize_module(model, mesh, plan)
    report = fusedmlp.fuse(model, dry_run=True)
    reasons = [s.reason for s in report.skipped]
    assert len(reasons) == 1 and "down_proj.weight is sharded as (Shard(dim=0),)" in reasons[0], reasons


def _tp_dropout_worker(rank, world, tmp):
    """Dropout of h under tensor parallel drops what the unsharded module drops with the same
    seed (each rank its columns of the whole mask): outputs and every gradient, gated and plain,
    with and without a gradient, and through the recompute path that works in column blocks."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from fusedmlp import FusedGatedMLP, FusedMLP, options
    from fusedmlp.parallel import FusedMLPParallel

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    cases = [
        (FusedGatedMLP(D, H, "silu", bias=True, hidden_dropout=0.3), {}),
        (FusedMLP(D, H, "gelu_tanh", hidden_dropout=0.5), {}),
        (FusedGatedMLP(D, H, "gelu", recompute="gemm", hidden_dropout=0.3), {"recompute_block_width": 8}),
    ]
    for ref, opts in cases:
        sharded = parallelize_module(copy.deepcopy(ref), mesh, FusedMLPParallel())
        x = torch.randn(3, 5, D)
        dy = torch.randn(3, 5, D)
        with options.override(**opts):
            outs = []
            for m in (ref, sharded):
                xg = x.clone().requires_grad_()
                torch.manual_seed(7)
                y = m(xg)
                y.backward(dy)
                with torch.no_grad():
                    torch.manual_seed(8)
                    y_nograd = m(x)
                grads = {n: _full(p.grad) for n, p in m.named_parameters()}
                outs.append((y.detach(), y_nograd, xg.grad, grads))
        (y0, n0, dx0, g0), (y1, n1, dx1, g1) = outs
        _close(y1, y0, f"{type(ref).__name__} TP dropout output")
        _close(n1, n0, f"{type(ref).__name__} TP dropout output without grad")
        _close(dx1, dx0, f"{type(ref).__name__} TP dropout dx")
        for k in g0:
            _close(g1[k], g0[k], f"{type(ref).__name__} TP dropout d{k}")
        torch.manual_seed(9)
        other = ref(x)
        assert not torch.allclose(other, n0), "a different seed must drop differently"


def _sp_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from fusedmlp.parallel import FusedMLPParallel

    mesh = init_device_mesh("cpu", (world,))
    eager, fused = _models()
    for block in fused:
        block.norm = nn.Identity()  # the norm runs on the sequence shard: keep the MLP alone
    for block in eager:
        block.norm = nn.Identity()
    parallelize_module(fused, mesh, {f"{i}.mlp": FusedMLPParallel(sequence_parallel=True) for i in (0, 1)})
    torch.manual_seed(1)
    xs = [torch.randn(2, 4 * world, D) for _ in range(STEPS)]
    shard = slice(4 * rank, 4 * (rank + 1))
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    want, _ = _train(eager, xs)
    for i, x in enumerate(xs):
        y = fused(x[:, shard].contiguous())  # this rank's sequence shard in, its shard out
        _close(y, want[i][:, shard], f"SP output, step {i}")
        loss = y.square().sum() / want[i].numel()  # the sum of all ranks' terms is the eager loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in fused.state_dict().items():
        _close(v, eager.state_dict()[k], f"SP {k} after {STEPS} steps")


def _fsdp_worker(rank, world, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from fusedmlp.parallel import fsdp_shard_placement, optimizer_state_from_source, optimizer_state_to_source

    mesh = init_device_mesh("cpu", (world,))
    eager, fused = _models()
    ref = _models()[0]
    place = fsdp_shard_placement(fused)
    for block in fused:
        fully_shard(block, mesh=mesh, shard_placement_fn=place)
    fully_shard(fused, mesh=mesh, shard_placement_fn=place)
    for block in eager:
        fully_shard(block, mesh=mesh)
    fully_shard(eager, mesh=mesh)

    torch.manual_seed(1)
    xs = [torch.randn(2, 5, D) for _ in range(STEPS)]
    got, opt = _train(fused, xs)
    _, eager_opt = _train(eager, xs)
    ref_out, _ = _train(ref, xs)
    for i in range(STEPS):
        _close(got[i], ref_out[i], f"FSDP2 output, step {i}")

    # state_dict: no collective; keys, placements and local shards equal the unfused FSDP2 run's
    with CommDebugMode() as comm:
        sd = fused.state_dict()
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    esd = eager.state_dict()
    assert list(sd) == list(esd)
    for k in sd:
        assert isinstance(sd[k], DTensor) and sd[k].placements == esd[k].placements, k
        _close(sd[k], ref.state_dict()[k], f"FSDP2 {k}")
        torch.testing.assert_close(sd[k].to_local(), esd[k].to_local(), rtol=1e-5, atol=1e-5)

    # torch.distributed.checkpoint.state_dict: get (sharded and full) and set (full)
    msd = get_model_state_dict(fused)
    assert list(msd) == list(esd)
    full = get_model_state_dict(fused, options=StateDictOptions(full_state_dict=True))
    for k, v in full.items():
        _close(v, ref.state_dict()[k], f"full state_dict {k}")
    _, other = _models(seed=5)
    for block in other:
        fully_shard(block, mesh=mesh, shard_placement_fn=fsdp_shard_placement(other))
    set_model_state_dict(other, full, options=StateDictOptions(full_state_dict=True))
    for k, v in other.state_dict().items():
        _close(v, ref.state_dict()[k], f"set_model_state_dict {k}")

    # optimizer state: the fused run's, converted, equals the unfused run's (and back)
    fused_osd = get_optimizer_state_dict(fused, opt)
    eager_osd = get_optimizer_state_dict(eager, eager_opt)
    converted = optimizer_state_to_source(fused, fused_osd)
    assert set(converted["state"]) == set(eager_osd["state"])
    for name, per in eager_osd["state"].items():
        for key, value in per.items():
            _close(converted["state"][name][key], value, f"optimizer {name} {key}")
    assert [set(g["params"]) for g in converted["param_groups"]] == [
        set(g["params"]) for g in eager_osd["param_groups"]
    ]
    back = optimizer_state_from_source(fused, eager_osd)
    assert set(back["state"]) == set(fused_osd["state"])
    for name, per in fused_osd["state"].items():
        for key, value in per.items():
            _close(back["state"][name][key], value, f"optimizer back {name} {key}")

    # DCP: fused FSDP2 -> unfused plain model, unfused FSDP2 -> fused plain model
    path = os.path.join(tmp, "ckpt_fused")
    dcp.save(fused.state_dict(), checkpoint_id=path)
    path_e = os.path.join(tmp, "ckpt_eager")
    dcp.save(eager.state_dict(), checkpoint_id=path_e)
    dist.barrier()
    fused_md, eager_md = (dcp.FileSystemReader(p).read_metadata().state_dict_metadata for p in (path, path_e))
    assert fused_md == eager_md, "DCP metadata of the fused FSDP2 model differs from the unfused one's"
    plain_eager, plain_fused = _models(seed=7)
    for model, ckpt in ((plain_eager, path), (plain_fused, path_e), (plain_fused, path)):
        target = model.state_dict()
        dcp.load(target, checkpoint_id=ckpt)  # in place: the views land in the module
        for k, v in model.state_dict().items():
            _close(v, ref.state_dict()[k], f"DCP {ckpt} -> {type(model[0].mlp).__name__} {k}")


def _two_d_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from fusedmlp.parallel import FusedMLPParallel, fsdp_shard_placement

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    eager, fused = _models()
    ref = _models()[0]
    parallelize_module(fused, mesh["tp"], {f"{i}.mlp": FusedMLPParallel() for i in (0, 1)})
    place = fsdp_shard_placement(fused)
    for block in fused:
        fully_shard(block, mesh=mesh["dp"], shard_placement_fn=place)
    parallelize_module(eager, mesh["tp"], _torch_plan())
    for block in eager:
        block.inplace = False
        fully_shard(block, mesh=mesh["dp"])
    torch.manual_seed(1 + mesh["dp"].get_local_rank())  # each data-parallel rank its own batch
    xs = [torch.randn(2, 5, D) for _ in range(STEPS)]
    got, _ = _train(fused, xs)
    want, _ = _train(eager, xs)
    for i in range(STEPS):
        _close(got[i], want[i], f"2-D output, step {i}")
    sd, esd = fused.state_dict(), eager.state_dict()
    assert list(sd) == list(esd)
    for k in sd:
        assert sd[k].placements == esd[k].placements, (k, sd[k].placements, esd[k].placements)
        _close(sd[k], esd[k], f"2-D {k} after {STEPS} steps")
    _dcp_matrix(tmp, {"fused 2-D": fused, "unfused 2-D": eager}, eager)
    del ref


@pytest.mark.parametrize("worker", [_tp_worker, _sp_worker, _fsdp_worker])
def test_two_ranks(worker):
    _run(worker, 2)


def test_tensor_parallel_dropout_is_the_unsharded_mask():
    _run(_tp_dropout_worker, 2)


def test_fuse_on_a_tensor_parallel_model():
    _run(_fuse_sharded_worker, 2)


def _sharded_kinds(world):
    """Every layout of the checkpoint matrix, fused and unfused, holding _models()'s weights:
    plain, tensor parallel (1-D, all ranks), FSDP2 (1-D, all ranks), FSDP2 x TP (2 x world/2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from fusedmlp.parallel import FusedMLPParallel, fsdp_shard_placement

    flat = init_device_mesh("cpu", (world,))
    two_d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    kinds = {}
    for layout in ("plain", "TP", "FSDP2", "2-D"):
        eager, fused = _models()
        tp_mesh = flat if layout == "TP" else two_d["tp"]
        if layout in ("TP", "2-D"):
            parallelize_module(fused, tp_mesh, {f"{i}.mlp": FusedMLPParallel() for i in (0, 1)})
            parallelize_module(eager, tp_mesh, _torch_plan())
        if layout in ("FSDP2", "2-D"):
            dp_mesh = flat if layout == "FSDP2" else two_d["dp"]
            place = fsdp_shard_placement(fused)
            for f, e in zip(fused, eager, strict=True):
                fully_shard(f, mesh=dp_mesh, shard_placement_fn=place)
                fully_shard(e, mesh=dp_mesh)
        kinds[f"fused {layout}"], kinds[f"unfused {layout}"] = fused, eager
    return kinds


def _checkpoint_matrix_worker(rank, world, tmp):
    """{plain, TP, FSDP2, 2-D} x {fused, unfused}: each saves a DCP checkpoint, and every one
    of the eight loads every checkpoint in place and then holds the saved weights; the fused
    checkpoints' metadata equal the unfused ones' of the same layout."""
    import torch.distributed.checkpoint as dcp

    kinds = _sharded_kinds(world)
    ref = _models()[0].state_dict()
    paths = {}
    for name, model in kinds.items():
        paths[name] = os.path.join(tmp, "matrix", name.replace(" ", "_"))
        dcp.save(model.state_dict(), checkpoint_id=paths[name])
    dist.barrier()
    for name in kinds:
        if name.startswith("fused"):
            mds = [
                dcp.FileSystemReader(paths[n]).read_metadata().state_dict_metadata
                for n in (name, f"un{name}")
            ]
            assert mds[0] == mds[1], f"DCP metadata: {name} vs un{name}"
    for src, path in paths.items():
        for name, model in kinds.items():
            with torch.no_grad():
                for p in model.parameters():  # garbage first: the load must overwrite every value
                    p.fill_(0.25)
            dcp.load(model.state_dict(), checkpoint_id=path)
            for k, v in model.state_dict().items():
                _close(v, ref[k], f"DCP {src} -> {name}: {k}")


def test_checkpoint_matrix_four_ranks():
    _run(_checkpoint_matrix_worker, 4)


@pytest.mark.slow
def test_tensor_parallel_through_the_kernels(monkeypatch):
    """The tensor-parallel run with the Triton kernels (under the interpreter on a CPU; CI sets
    TRITON_INTERPRET=1 for every test, so there all of these take the kernel path)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned workers as they import
    _run(_tp_worker, 2)


def test_fsdp2_by_tensor_parallel_2x2():
    _run(_two_d_worker, 4)


def test_functional_ops_reject_dtensors():
    from torch.distributed.tensor import DTensor

    from fusedmlp import functional

    class Fake(DTensor):  # isinstance is all the check looks at
        pass

    x = torch.randn(3, D).as_subclass(Fake)
    with pytest.raises(TypeError, match="is a DTensor; fusedmlp's functional ops take local tensors"):
        functional.gated_mlp(x, torch.randn(2 * H, D), None, torch.randn(D, H), None)
    with pytest.raises(TypeError, match="FusedMLPParallel"):
        functional.act(x)


def _ep_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    from fusedmlp import FusedGatedExperts
    from fusedmlp.parallel import ExpertsParallel

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = FusedGatedExperts(4, D, H, "silu", bias=True)
    sharded = FusedGatedExperts(4, D, H, "silu", bias=True)
    sharded.load_state_dict(ref.state_dict())
    holder = nn.ModuleDict({"experts": sharded})
    parallelize_module(holder, mesh, {"experts": ExpertsParallel()})
    assert isinstance(sharded.gate_up, DTensor) and sharded.gate_up.to_local().shape[0] == 4 // world
    with CommDebugMode() as comm:
        sd = sharded.state_dict()
    assert comm.get_total_counts() == 0 and list(sd) == list(ref.state_dict())
    assert all(isinstance(v, DTensor) and v.placements == (Shard(0),) for v in sd.values())
    opt_s = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(11, D)
        index = torch.rand(11, 4).topk(2, dim=1).indices
        weights = torch.softmax(torch.randn(11, 2), -1)
        outs = []
        for model, opt in ((sharded, opt_s), (ref, opt_r)):
            xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
            y = model(xx, index, ww)
            y.square().mean().backward()
            outs.append((y.detach(), xx.grad, ww.grad))
            opt.step()
            opt.zero_grad()
        for name, a, b in zip(("y", "dx", "d weights"), *outs, strict=True):
            _close(a, b, f"EP {name}, step {step}")
    for k, v in sharded.state_dict().items():
        _close(v, ref.state_dict()[k], f"EP {k} after {STEPS} steps")


def test_expert_parallel_two_ranks():
    _run(_ep_worker, 2)
