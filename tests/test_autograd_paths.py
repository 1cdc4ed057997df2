"""The paths of torch's BatchNorm users beyond forward and backward: double backward (gradient
penalties, MAML), torch.func transforms, forward-mode AD, torch.fx symbolic tracing,
torch.jit.trace and torch.compile with dynamic shapes.
Each is compared with torch.nn.BatchNorm on every backend (the Triton kernels through the
interpreter on CPU)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import tritonbn

from .helpers import BACKENDS


def _pair(activation: str | None = None, channels: int = 3) -> tuple[nn.Module, nn.Module]:
    """A tritonbn BatchNorm2d and torch's (then the same activation), with equal random state."""
    ours = tritonbn.BatchNorm2d(channels, activation=activation)
    theirs = nn.BatchNorm2d(channels)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
        theirs.running_mean.uniform_(-0.5, 0.5)
        theirs.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    torch_act = {None: nn.Identity(), "relu": nn.ReLU(), "silu": nn.SiLU()}[activation]
    return ours, nn.Sequential(theirs, torch_act)


def _dtype(backend: str) -> torch.dtype:
    # float64 never reaches the kernels (the dispatcher gives it to torch): the Triton backend is
    # checked in float32.
    return torch.float32 if backend == "triton" else torch.float64


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradient_penalty_matches_torch(backend, training, activation):
    # loss = Σ y² + ‖∂(Σ y²)/∂x‖²: differentiating the penalty needs the backward's own backward.
    dtype = _dtype(backend)
    ours, theirs = _pair(activation)
    ours, theirs = ours.to(dtype).train(training), theirs.to(dtype).train(training)
    x = torch.randn(5, 3, 4, 3, dtype=dtype)
    grads = {}
    for name, module in (("ours", ours), ("theirs", theirs)):
        inp = x.clone().requires_grad_()
        with tritonbn.backend(backend):
            y = module(inp)
            (g,) = torch.autograd.grad(y.square().sum(), inp, create_graph=True)
            (y.square().sum() + g.square().sum()).backward()
        params = dict(module.named_parameters())
        weight = params.get("weight", params.get("0.weight"))
        grads[name] = (inp.grad, weight.grad)
    for got, want in zip(grads["ours"], grads["theirs"], strict=True):
        torch.testing.assert_close(got, want, **_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_vmap_in_eval_match_torch(backend):
    dtype = _dtype(backend)
    ours, theirs = _pair()
    ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
    x = torch.randn(4, 5, 3, 4, 3, dtype=dtype)
    with tritonbn.backend(backend):
        got_vmap = torch.func.vmap(ours)(x)
        got_grad = torch.func.grad(lambda inp: ours(inp).square().sum())(x[0])
    torch.testing.assert_close(got_vmap, torch.func.vmap(theirs)(x), **_tolerance(dtype))
    want_grad = torch.func.grad(lambda inp: theirs(inp).square().sum())(x[0])
    torch.testing.assert_close(got_grad, want_grad, **_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_matches_torch(backend):
    dtype = _dtype(backend)
    ours, theirs = _pair()
    ours, theirs = ours.to(dtype), theirs[0].to(dtype)
    state = {name: tensor.clone() for name, tensor in theirs.state_dict().items()}
    x = torch.randn(6, 3, 4, 4, dtype=dtype)
    with tritonbn.backend(backend):
        got = torch.func.functional_call(ours, dict(state), (x,))
    want = torch.func.functional_call(theirs, {k: v.clone() for k, v in state.items()}, (x,))
    torch.testing.assert_close(got, want, **_tolerance(dtype))


def _first_line(error: BaseException) -> str:
    """A ``match`` pattern for an error with ``error``'s first line (torch's own message)."""
    return re.escape(str(error).splitlines()[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_in_training_does_what_torch_does(backend):
    # torch refuses to update running statistics per vmapped sample (a documented limit);
    # tritonbn, which hands torch.func calls to torch, behaves the same way, error or result.
    ours, theirs = _pair()
    x = torch.randn(2, 4, 3, 4, 3)
    try:
        want = torch.func.vmap(theirs)(x)
    except Exception as error:  # whatever torch raises, tritonbn must raise the same error
        with tritonbn.backend(backend), pytest.raises(type(error), match=_first_line(error)):
            torch.func.vmap(ours)(x)
    else:
        with tritonbn.backend(backend):
            torch.testing.assert_close(torch.func.vmap(ours)(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_forward_mode_ad_matches_torch(backend, training, memory_efficient):
    # Dual tensors need each op's forward derivative: the call goes to torch's batch_norm, whose
    # jvp the kernels' autograd Functions lack (they would raise after updating the statistics).
    dtype = _dtype(backend)
    ours, theirs = _pair()
    ours.memory_efficient = memory_efficient
    ours, theirs = ours.to(dtype).train(training), theirs.to(dtype).train(training)
    x, tangent = torch.randn(5, 3, 4, 3, dtype=dtype), torch.randn(5, 3, 4, 3, dtype=dtype)
    results = {}
    for name, module in (("ours", ours), ("theirs", theirs)):
        for _ in range(2):  # the second call would take a remembered fast path if there were one
            with tritonbn.backend(backend), fwAD.dual_level():
                primal, out_tangent = fwAD.unpack_dual(module(fwAD.make_dual(x, tangent)))
        results[name] = (primal, out_tangent, *module.buffers())
    for got, want in zip(results["ours"], results["theirs"], strict=True):
        torch.testing.assert_close(got, want, **_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_func_grad_in_training_fails_as_torch_does_and_changes_nothing(backend, memory_efficient):
    # torch.func.grad refuses to mutate the captured running statistics; torch's module raises at
    # its first in-place update, the batch count, before the statistics change. So does tritonbn.
    ours, theirs = _pair()
    ours.memory_efficient = memory_efficient
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError) as theirs_error:
        torch.func.grad(lambda inp: theirs(inp).square().sum())(x)
    before = [buffer.clone() for buffer in ours.buffers()]
    with (
        tritonbn.backend(backend),
        pytest.raises(type(theirs_error.value), match=_first_line(theirs_error.value)),
    ):
        torch.func.grad(lambda inp: ours(inp).square().sum())(x)
    for buffer, saved in zip(ours.buffers(), before, strict=True):
        assert torch.equal(buffer, saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_efficient_under_torch_func_matches_the_plain_module(backend):
    # An autograd Function without setup_context cannot serve torch.func: the memory-efficient
    # mode runs torch's batch norm there, with its floored weight and dγ straight through.
    dtype = _dtype(backend)
    plain, _ = _pair()
    lean = copy.deepcopy(plain)
    lean.memory_efficient = True
    with torch.no_grad():
        plain.weight[0] = lean.weight[0] = 1e-7  # floored to MIN_WEIGHT in the lean module
    plain, lean = plain.to(dtype).eval(), lean.to(dtype).eval()
    x = torch.randn(4, 3, 2, 2, dtype=dtype)

    def loss(module, params, inp):
        return torch.func.functional_call(module, params, (inp,)).square().sum()

    with tritonbn.backend(backend):
        got = torch.func.grad(loss, argnums=(1, 2))(lean, dict(lean.named_parameters()), x)
    with torch.no_grad():
        plain.weight[0] = tritonbn.reference.MIN_WEIGHT
    want = torch.func.grad(loss, argnums=(1, 2))(plain, dict(plain.named_parameters()), x)
    torch.testing.assert_close(got, want, **_tolerance(dtype))


def test_fx_symbolic_trace_keeps_each_module_whole():
    # torch.fx keeps torch.nn's BatchNorm as one call_module node (a leaf); tritonbn's modules put
    # the same node in the graph, which then calls the module on tensors.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        tritonbn.BatchNorm2d(4, activation="relu"),
        tritonbn.FrozenBatchNorm2d(4),
        tritonbn.SyncBatchNorm(4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        tritonbn.BatchNorm1d(5),
        tritonbn.BatchNorm(5, num_dims=2),
    )
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    nodes = [(node.op, node.target) for node in traced.graph.nodes]
    assert nodes[1:-1] == [("call_module", str(index)) for index in range(len(model))]
    x = torch.randn(3, 3, 8, 8)
    for training in (True, False):
        model.train(training)
        traced.train(training)
        torch.testing.assert_close(traced(x), model(x))
    for mine, theirs in zip(traced.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_fx_feature_extraction_of_a_fused_resnet():
    # torchvision's feature extractor traces with torch.fx; a fused block's BatchNorm takes the
    # residual as a second argument of its node.
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = tritonbn.fuse(tritonbn.convert(torchvision.models.resnet18(num_classes=10))).eval()
    extractor = create_feature_extractor(model, {"layer1": "layer1", "fc": "logits"})
    block_bn = next(node for node in extractor.graph.nodes if node.target == "layer1.0.bn2")
    assert block_bn.op == "call_module" and len(block_bn.args) == 2
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(extractor(x)["logits"], model(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_jit_trace_matches_eager(backend, training):
    ours, _ = _pair("relu")
    ours.train(training)
    eager = copy.deepcopy(ours)
    x = torch.randn(6, 3, 5, 5)
    with tritonbn.backend(backend):
        traced = torch.jit.trace(ours, x, check_trace=False)  # runs the module once
        eager(x)
        got, want = traced(x), eager(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, eager.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, eager.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", (*BACKENDS, "auto"))
def test_compile_dynamic_fullgraph_matches_eager(backend):
    # One graph for every batch size: dynamic shapes, no graph break (fullgraph raises on one).
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        tritonbn.BatchNorm2d(4, activation="relu"),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        tritonbn.BatchNorm1d(5),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    with tritonbn.backend(backend):
        for batch in (4, 5, 7):
            x = torch.randn(batch, 1, 8, 8)
            got, want = compiled(x), eager(x)
            got.square().sum().backward()
            want.square().sum().backward()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()
