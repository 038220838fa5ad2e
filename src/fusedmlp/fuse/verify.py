"""The proof: a candidate replaces a block only if it computes the same function.

Structural guessing is only safe because of this step. For one candidate it checks, in order:
1. the state_dict is unchanged (same keys, order, values): nothing of the block is left out;
2. the block does not behave differently in training but for its dropouts on h (between the
   activation and the output projection) and on its output, found by watching which tensors
   the dropouts produce: its output in train mode, with those held in eval, must equal its eval
   output bit for bit (batch statistics, a dropout elsewhere: refused); the fused module applies
   the dropout of h in its kernels (same p and scaling) and keeps the output dropout module;
3. on random inputs spanning small to large magnitudes (where clipped or saturating activations
   differ from their look-alikes) the candidate agrees with the block under the numerics contract,
   against a float64 copy: in fp32 on a copy with fresh random weights (so that the proof cannot
   pass by accident on degenerate weights, e.g. a zero-initialised output projection, which
   would make every activation guess agree), output and every gradient (input, weights,
   biases: a block with a custom backward is caught here); and in the block's dtype with its
   own weights, the output.
Blocks holding state other than their projections (a norm, attention: a whole transformer
layer whose children happen to fit), with hooks, a patched forward, or frozen and trainable
weights mixed are left alone before any of this: the swap would lose the hooks, or freeze/unfreeze weights.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import inspect
import textwrap
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .. import options
from ..numerics import ContractCheck, check_contract, state_dict_equal
from .find import Candidate

# [4, 16, D] inputs: a batch and a sequence dimension, as models call their MLPs; 64 rows keep
# the max-error statistic steady while staying cheap for any block size.
PROOF_LEAD = (4, 16)
# The batch entries are scaled by these: activations differ where inputs are large (a clip at 6
# or 10, a clamp in the forward, saturation) as much as where they are small (gelu's two forms),
# and a probe with unit-scale weights sees pre-activations of about these magnitudes, both signs.
PROOF_SCALES = (1.0, 4.0, 16.0, 64.0)
# The proof's inputs and probe weights come from a generator of its own with this seed: the
# decision is a function of the block alone, the same on every call (and the caller's random
# stream is untouched).
PROOF_SEED = 20261202
# atol in epsilons of the largest reference value. The max error over one random sample is a
# noisy statistic: with 1 epsilon, an equivalent fp32 Llama MLP failed its dx check in about 1
# proof in 300 (fused max 3x eager's at one cancelling element, where eager happened to round
# well). 4 epsilons removes that; a wrong guess (gelu for gelu_tanh, a dropped scale or residual)
# misses by orders of magnitude more.
ATOL_EPS = 4.0


@dataclasses.dataclass(frozen=True)
class Proof:
    """The outcome for one candidate: ``module`` is the proven replacement, or None with ``reason``."""

    module: nn.Module | None
    reason: str = ""
    checks: tuple[ContractCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return self.module is not None


@contextlib.contextmanager
def modes_restored(module: nn.Module) -> Iterator[None]:
    """Put back every submodule's train/eval flag on exit."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@dataclasses.dataclass(frozen=True)
class Dropouts:
    """Where a block's dropouts act: ``output`` on its output (the child's name), ``hidden`` on the
    output projection's input, h (the child's name). One module may be both (VitDet, FocalNet
    call one nn.Dropout twice)."""

    output: str | None = None
    hidden: str | None = None

    def output_module(self, block: nn.Module) -> nn.Module | None:
        return block.get_submodule(self.output) if self.output else None

    def hidden_p(self, block: nn.Module) -> float:
        return float(block.get_submodule(self.hidden).p) if self.hidden else 0.0  # type: ignore[arg-type]


def _dropouts(block: nn.Module, x: Tensor, out_proj: str) -> tuple[Tensor, Dropouts | str]:
    """The block's (eval) output on ``x``, and where its dropouts act; a reason instead where a
    dropout acts anywhere else (on the input, between the projections and the activation...),
    which the fused module could not reproduce. In eval a dropout returns its input itself,
    which is how its output is recognised downstream."""
    calls: list[tuple[str, object]] = []
    proj_inputs: list[object] = []
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, n=name: calls.append((n, out)))
        for name, child in block.named_children()
        if isinstance(child, _DropoutNd)
    ]
    proj = block.get_submodule(out_proj)
    hooks.append(proj.register_forward_pre_hook(lambda _m, args: proj_inputs.append(args[0])))
    try:
        y = block(x)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(y, Tensor):
        raise TypeError(f"the block returns {type(y).__name__}, not a tensor")
    output = hidden = None
    for name, out in calls:
        if out is y and output is None:
            output = name
        elif any(out is p for p in proj_inputs) and hidden is None:
            if type(block.get_submodule(name)) is not nn.Dropout:
                kind = type(block.get_submodule(name)).__name__
                return y, f"its {kind} {name} on h is not an elementwise nn.Dropout, which the kernels apply"
            hidden = name
        else:
            return y, f"its dropout {name} acts elsewhere than on h or on the output: not fusable"
    return y, Dropouts(output, hidden)


def _changes_in_training(block: nn.Module, x: Tensor, y_eval: Tensor, dropouts: Dropouts) -> bool:
    """Whether the block's train-mode output differs from its eval output with its known dropouts
    held in eval: then something else (batch statistics, another dropout) depends on the mode."""
    with modes_restored(block):
        block.train()
        for name in (dropouts.output, dropouts.hidden):
            if name is not None:
                block.get_submodule(name).eval()
        return not torch.equal(block(x), y_eval)


def _randomized(block: nn.Module, generator: torch.Generator) -> nn.Module:
    """A float32 copy of ``block`` with fresh random weights (scaled like nn.Linear's init)."""
    probe = copy.deepcopy(block).float()
    for p in probe.parameters():
        scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1
        p.copy_(torch.randn(p.shape, generator=generator, device=p.device) * scale)
    return probe


def _check(name: str, eager: nn.Module, cand: nn.Module, x: Tensor) -> ContractCheck:
    reference = copy.deepcopy(eager).double()
    return check_contract(name, cand(x), eager(x), reference(x.double()), ATOL_EPS)


def _whole(t: Tensor) -> Tensor:
    """A copy of ``t``, gathered to the full tensor when sharded (DTensor)."""
    full_tensor = getattr(t, "full_tensor", None)  # DTensor
    return full_tensor() if full_tensor is not None else t.clone()


def forward_backward(module: nn.Module, x: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    """Output, input gradient and parameter gradients, the latter under the replaced module's
    names (``source_grads`` of a fused module), sharded ones gathered. Clears the gradients it
    made: a FusedLinearAct shares its projection with the block it was built from."""
    x = x.detach().clone().requires_grad_()
    with torch.enable_grad():
        y = module(x)
        y.backward(grad_y.to(y.dtype))
    source_grads = getattr(module, "source_grads", None)
    grads = source_grads() if source_grads else {n: p.grad for n, p in module.named_parameters()}
    out = {
        "y": _whole(y.detach()),
        "dx": x.grad,
        **{f"d {n}": _whole(g) for n, g in grads.items() if g is not None},
    }
    module.zero_grad(set_to_none=True)
    return out


def _check_with_grads(
    name: str, eager: nn.Module, cand: nn.Module, x: Tensor, generator: torch.Generator
) -> list[ContractCheck]:
    """The contract on the output, the input gradient and every weight and bias gradient."""
    reference = copy.deepcopy(eager).double()
    with torch.no_grad():
        shape = eager(x).shape
    grad_y = torch.randn(shape, generator=generator, device=x.device, dtype=torch.float64)
    c, e = forward_backward(cand, x, grad_y), forward_backward(eager, x, grad_y)
    r = forward_backward(reference, x.double(), grad_y)
    if list(c) != list(e):
        raise ValueError(f"gradients differ in which tensors they cover: {list(c)} vs {list(e)}")
    return [check_contract(f"{name}: {k}", c[k], e[k], r[k], ATOL_EPS) for k in e]


def _not_swappable(block: nn.Module) -> str:
    """Why a block must stay whatever its forward computes; empty when nothing stands in the way."""
    for name, m in block.named_modules():
        where = f" (on {name})" if name else ""
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return f"has hooks{where}, which the fused module would not run"
        if "forward" in vars(m):  # patched on the instance, e.g. by accelerate's offloading hooks
            return f"its forward is patched on the instance{where}"
    names: dict[int, str] = {}
    for name, child in block._modules.items():  # every registration: named_children() drops repeats
        if child is not None and names.setdefault(id(child), name) != name:
            return f"{names[id(child)]} and {name} are one module (tied); a merged weight would untie them"
    for name, child in block.named_children():
        if isinstance(child, nn.Linear) and type(child).forward is not nn.Linear.forward:
            kind = type(child).__name__
            return f"its projection {name} is a {kind} with its own forward (quantized or adapted)"
    tensors = [(n, t) for n, t in block.state_dict().items() if isinstance(t, Tensor)]
    if odd := [f"{n} ({t.dtype})" for n, t in tensors if not t.is_floating_point()]:
        return f"holds non-floating-point weights ({', '.join(odd[:2])}): quantized layers are not fused"
    if len(dtypes := {t.dtype for _, t in tensors}) > 1:
        listed = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return f"mixes weight dtypes ({listed}); the fused kernels take one"
    if len({t.device for _, t in tensors}) > 1:
        return "its weights are on several devices"
    flags = {p.requires_grad for p in block.parameters()}
    if len(flags) > 1:
        return "mixes frozen and trainable weights, which a merged weight cannot"
    return ""


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _forward_params(block: nn.Module) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return None


def input_name(block: nn.Module) -> str | None:
    """The name of the one input ``block.forward`` takes (callers may pass it by keyword)."""
    params = _forward_params(block)
    return params[0].name if params and params[0].kind not in _VARIADIC else None


def _calls_in_parent(parent: nn.Module | None, name: str) -> list[tuple[int, set[str]]] | None:
    """How ``parent.forward`` calls its child ``name``: (positional count, keyword names) per call
    ``self.<name>(...)`` in its source; None where the source cannot be read. nn.Sequential calls
    each child with the one previous output."""
    if isinstance(parent, nn.Sequential):
        return [(1, set())]
    if parent is None or not name:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(parent).forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    calls = []
    for node in ast.walk(tree):
        f = node.func if isinstance(node, ast.Call) else None
        if not (isinstance(f, ast.Attribute) and f.attr == name and isinstance(f.value, ast.Name)):
            continue
        if f.value.id != "self":
            continue
        keywords = {k.arg for k in node.keywords if k.arg}
        unpacked = any(isinstance(a, ast.Starred) for a in node.args) or len(keywords) < len(node.keywords)
        calls.append((99 if unpacked else len(node.args), keywords))
    return calls


def call_problem(block: nn.Module, parent: nn.Module | None = None, name: str = "") -> str:
    """Why a call of ``block`` might not be one the proof covers (empty when none): the proof
    calls ``block(x)``; a forward that needs more arguments is refused, and one with optional
    extras only where its parent's calls can be seen to pass the input alone."""
    params = _forward_params(block)
    if params is None:
        return ""
    if not params or params[0].kind in _VARIADIC:
        return "its forward takes no single named input (*args), which the proof cannot follow"
    first, extra = params[0], params[1:]
    required = [p.name for p in extra if p.default is p.empty and p.kind not in _VARIADIC]
    if required:
        return (
            f"its forward takes more than its input ({', '.join(required)}); the fused module "
            "computes from the input alone, and the proof covers no call with more"
        )
    if not extra:
        return ""
    optional = ", ".join(p.name for p in extra)
    calls = _calls_in_parent(parent, name)
    if calls is None:
        return (
            f"its forward takes optional arguments ({optional}) and how its parent calls it cannot "
            "be seen; a call passing them would not be covered by the proof"
        )
    for positional, keywords in calls:
        if positional > 1 or keywords - {first.name} or (positional == 1 and keywords):
            return f"its parent passes it more than its input ({optional} among {first.name}'s companions)"
    return ""


def prove(block: nn.Module, candidate: Candidate) -> Proof:
    """Build ``candidate`` for ``block`` and prove it equivalent (see the module docstring).

    ``block`` is left as it was (weights, train/eval flags); the proof runs without grad. Inputs
    (spanning PROOF_SCALES) and probe weights come from a private generator seeded with
    PROOF_SEED: the same block gets the same decision every time, and the caller's random
    stream is untouched. Memory: while it runs, copies of the block in float32 (two) and
    float64 (one) exist at a time.
    """
    param = next(iter(block.parameters()))
    device, dtype = param.device, param.dtype
    if device.type == "meta":
        return Proof(None, "weights are on the meta device; load them before fusing")
    if type(param).__name__ == "DTensor":  # sharded by torch's tensor parallel: fuse/sharded.py
        from .sharded import prove_sharded

        return prove_sharded(block, candidate, prove)
    if reason := _not_swappable(block):
        return Proof(None, reason)
    covered = {
        f"{p.name}.{k}" for p in candidate.projections for k in block.get_submodule(p.name).state_dict()
    }
    if outside := [k for k in block.state_dict() if k not in covered]:
        more = ", ..." if len(outside) > 3 else ""
        listed = ", ".join(outside[:3]) + more
        return Proof(None, f"holds state outside its projections ({listed}): more than an MLP")
    generator = torch.Generator(device=device).manual_seed(PROOF_SEED)
    x64 = torch.randn(
        *PROOF_LEAD,
        candidate.projections[0].in_features,
        generator=generator,
        device=device,
        dtype=torch.float64,
    ) * torch.tensor(PROOF_SCALES, device=device, dtype=torch.float64).view(-1, 1, 1)
    try:
        # fork_rng: building a fused module initialises weights (before copying), and dropout in
        # train mode draws; neither may move the caller's random stream.
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        # Autotuning off: which config a timing picks must not decide the proof (configs round
        # differently); the first config that fits runs, the same on every call.
        with modes_restored(block), torch.no_grad(), rng, options.override(autotune=False):
            block.eval()
            # The probe has fresh random fp32 weights: with the model's own weights a proof could
            # pass by accident (a zero-initialised output projection makes every guess agree).
            probe = _randomized(block, generator)
            y, roles = _dropouts(probe, x64.float(), candidate.projections[-1].name)
            if isinstance(roles, str):
                return Proof(None, roles)
            if _changes_in_training(probe, x64.float(), y, roles):
                return Proof(None, "output changes in training mode (batch statistics or randomness inside)")
            if roles.hidden and not candidate.fuses_hidden_dropout:
                into = candidate.projections[-1].name
                kind = candidate.kind.value
                return Proof(None, f"its dropout {roles.hidden} feeds {into}: {kind} blocks do not fuse it")
            fused = candidate.build(block, roles.output_module(block), roles.hidden_p(block))
            fused.requires_grad_(param.requires_grad)  # a frozen block stays frozen
            if not state_dict_equal(fused.state_dict(), block.state_dict()):
                missing = sorted(set(block.state_dict()) - set(fused.state_dict()))
                return Proof(None, f"state_dict would change (not covered: {missing or 'key order'})")
            # One at a time, so that the probe's copies are gone before the block's are made.
            probe.requires_grad_(True)
            checks = _check_with_grads(
                "fp32, random weights",
                probe,
                candidate.build(probe, roles.output_module(probe), roles.hidden_p(probe)),
                x64.float(),
                generator,
            )
            del probe
            checks.append(_check(f"{dtype}, model weights", block, fused, x64.to(dtype)))
    except Exception as e:  # a guess whose forward breaks is a failed proof, not a crash
        return Proof(None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    failed = [c for c in checks if not c.ok]
    if failed:
        return Proof(None, f"outputs differ: {failed[0]}", tuple(checks))
    fused.train(block.training)
    fused.input_name = input_name(block) or "x"  # type: ignore[assignment]
    return Proof(fused, "", tuple(checks))
