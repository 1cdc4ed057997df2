"""torch.compile: models using tritonbn trace into one graph (the kernels are custom ops with
fake implementations) and the compiled model matches eager — outputs, gradients, running
statistics — on every backend (the Triton one through the interpreter on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tritonbn

BACKENDS = ["auto", "reference", "triton"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: the module code objects are shared between tests, and
    dynamo allows only a few recompilations of one code object."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_net(activation: str | None = None, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        tritonbn.BatchNorm2d(6, activation=activation),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        tritonbn.BatchNorm1d(12, momentum=momentum),
        nn.Linear(12, 3),
    )


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.square().mean().backward()
    return out.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_no_graph_breaks(backend, training):
    model = small_net("relu").train(training)
    x = torch.randn(4, 1, 12, 12)
    with tritonbn.backend(backend):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "activation, momentum, fullgraph",
    # momentum=None reads num_batches_tracked on the host (as torch.nn.BatchNorm does): one break.
    [(None, 0.1, True), ("silu", 0.1, True), (None, None, False)],
)
def test_compiled_matches_eager(backend, activation, momentum, fullgraph):
    eager = small_net(activation, momentum)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=fullgraph)
    with tritonbn.backend(backend):
        for step in range(3):
            x = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(step))
            for model in (eager, compiled_net):
                model.train(step < 2)
            torch.testing.assert_close(_step(compiled, x), _step(eager, x), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_net.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_net.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("training", [True, False])
def test_custom_ops_pass_opcheck(training):
    # Schema, fake (meta) implementation and dispatch of the kernels' operators, as torch checks
    # them for any custom op.
    x = torch.randn(5, 3, 4, 4)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    if training:
        torch.library.opcheck(
            torch.ops.tritonbn.forward_train.default,
            (x, weight, bias, running_mean, running_var, 0.1, 1e-5, "split-welford", "relu", 0.0),
        )
        args = (x, weight, bias, None, None, 0.1, 1e-5, "fused-small", None, 0.0)
        _, save = torch.ops.tritonbn.forward_train(*args)
    else:
        torch.library.opcheck(
            torch.ops.tritonbn.forward_eval.default,
            (x, weight, bias, running_mean, running_var, 1e-5, None, 0.0),
        )
        save = None
    plan = "fused-small" if training else "eval"
    torch.library.opcheck(
        torch.ops.tritonbn.backward.default,
        (
            torch.randn_like(x),
            x,
            weight,
            bias,
            save,
            running_mean,
            running_var,
            1e-5,
            plan,
            None,
            0.0,
            True,
            True,
            False,
        ),
    )
