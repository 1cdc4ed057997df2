"""BatchNorm benchmarks: training forward, backward, eval forward and forward+backward of every case
in ``cases.MATRIX``, on every backend, grouped so that pytest-benchmark compares within a case.

All backends run as modules, the way networks call them: ``torch.nn.BatchNorm1d/2d`` (native),
``tritonbn.BatchNorm1d/2d`` on the automatic dispatcher, on a forced Triton plan or on the
reference, and ``torch.compile`` of torch's module. Each test checks its result once (shape, dtype,
finite values and a property batch norm guarantees) before timing it, so it is a test with
``--benchmark-disable`` too, and records time, bytes moved, GB/s and % of copy bandwidth in ``extra_info``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import pytest
import torch
from cases import MATRIX, Case, dtype_name
from measure import pass_bytes, throughput, time_step, triton_launches, user_timings_ms
from torch import nn

import tritonbn

# Per dtype: bound on |batch statistics of y − (0, 1)| in training, relative error of eval, and
# the factor of sqrt(count)·rms(values) that a per-channel sum may be off by.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Passes that a CUDA graph cannot capture, and why (seen on an H200, 2026-11-30: the failed capture
# then broke every later benchmark of the session).
UNCAPTURABLE = {
    "backward": "the backward of a forward run before the capture goes to the forward's stream, "
    "which the capture does not record",
}


def kernel_plan(x: torch.Tensor, training: bool, backend: str) -> str | None:
    """What tritonbn runs ``x`` on for ``backend``: a Triton plan's name, or the backend its
    dispatcher chose instead ("torch" on a CPU); None for the backends outside tritonbn. Skips a
    forced plan that cannot run this input."""
    if backend in tritonbn.PLANS:
        try:
            plan = tritonbn.explain(x, training=training, backend="triton", plan=backend)
        except ValueError as exc:
            pytest.skip(f"plan {backend!r} does not apply: {exc}")
    elif backend == "tritonbn":
        plan = tritonbn.explain(x, training=training)
    else:
        return None
    return plan.kernel or plan.backend


def _module_class(library: object, case: Case) -> type[nn.Module]:
    return getattr(library, "BatchNorm2d" if len(case.shape) == 4 else "BatchNorm1d")


_compiled: dict[tuple[Case, torch.device], tuple[nn.Module, Callable]] = {}


def compiled_torch_module(case: Case, device: torch.device) -> tuple[nn.Module, Callable]:
    """torch's module for ``case`` and its ``torch.compile`` (static shapes), kept while the tests
    of one case run in a row (``cases.MATRIX`` orders them so). Dynamo's caches are reset when the
    case changes: guards of earlier shapes never weigh on a call, and no shape reaches the
    recompile limit and silently falls back to eager."""
    key = (case, device)
    if key not in _compiled:
        _compiled.clear()
        torch._dynamo.reset()
        module = _module_class(nn, case)(case.channels).to(device)
        _compiled[key] = (module, torch.compile(module, dynamic=False))
    return _compiled[key]


def build(case: Case, backend: str, device: torch.device) -> tuple[nn.Module, Callable]:
    """(module, call): the BatchNorm module of ``backend`` and a function running it on an input."""
    if backend == "torch.compile":
        return compiled_torch_module(case, device)
    module = _module_class(nn if backend == "torch" else tritonbn, case)(case.channels).to(device)
    if backend in tritonbn.PLANS:
        dispatch = functools.partial(tritonbn.backend, "triton", plan=backend)
    elif backend == "reference":
        dispatch = functools.partial(tritonbn.backend, "reference")
    else:
        dispatch = contextlib.nullcontext

    def call(x: torch.Tensor) -> torch.Tensor:
        with dispatch():
            return module(x)

    return module, call


def make_step(
    pass_name: str, module: nn.Module, call: Callable, x: torch.Tensor, dy: torch.Tensor
) -> Callable[[], object]:
    """The function timed for ``pass_name``; the running statistics start at (0, 1)."""
    module.reset_running_stats()
    module.train(pass_name != "eval")
    if pass_name == "eval":
        return torch.no_grad()(lambda: call(x))
    if pass_name == "forward":
        return lambda: call(x)
    inputs = (x, module.weight, module.bias)
    if pass_name == "backward":
        y = call(x)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(call(x), inputs, dy)


def assert_sums(values: torch.Tensor, expected: torch.Tensor, dims: list[int], tol: float, what: str) -> None:
    """Per-channel sums of ``values`` equal ``expected``; rounding of a sum grows like a random
    walk, so the bound is ``tol``·sqrt(count)·rms(values)."""
    values = values.detach().double()
    count = values.numel() // values.shape[1]
    bound = tol * count**0.5 * values.pow(2).mean().sqrt() + tol
    error = (values.sum(dims) - expected.double()).abs().max()
    assert error <= bound, f"{what}: off by {error:.3g} (bound {bound:.3g})"


def check(pass_name: str, x: torch.Tensor, dy: torch.Tensor, result: object) -> None:
    """``result`` is batch norm's, with default affine parameters and running statistics (0, 1)."""
    tol = TOLERANCE[x.dtype]
    dims = [0, *range(2, x.dim())]
    if pass_name in ("forward", "eval"):
        y = result
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        if pass_name == "eval":  # y = x / sqrt(1 + eps)
            torch.testing.assert_close(y.float(), x.detach().float(), rtol=tol, atol=tol)
        else:  # each channel of y has batch mean 0 and biased variance var/(var + eps) ≈ 1
            y = y.detach().float()
            assert y.mean(dims).abs().max() <= tol
            assert (y.var(dims, unbiased=False) - 1).abs().max() <= tol
        return
    dx, dweight, dbias = result
    channels = (x.shape[1],)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dweight.shape == dbias.shape == channels
    assert all(torch.isfinite(grad).all() for grad in result)
    assert_sums(dy, dbias, dims, tol, "dbias = Σ dy")
    # Σ dx = γ·invstd/m·(m·Σdy − m·Σdy − Σx̂·Σ dy·x̂) = 0 per channel, since Σ x̂ = 0.
    assert_sums(dx, torch.zeros(channels, device=x.device), dims, tol, "Σ dx = 0")


@pytest.mark.parametrize(("pass_name", "case", "backend"), MATRIX, ids=str)
def test_batch_norm(
    benchmark, device: torch.device, copy_bandwidth: float | None, pass_name: str, case: Case, backend: str
) -> None:
    training = pass_name != "eval"
    x = case.make_input(device, requires_grad=training)
    dy = torch.randn_like(x)
    plan = kernel_plan(x, training, backend)
    module, call = build(case, backend, device)
    shape = "x".join(map(str, case.shape))
    benchmark.group = f"{pass_name} {shape} {dtype_name(case.dtype)} {case.layout}"
    step = make_step(pass_name, module, call, x, dy)
    check(pass_name, x, dy, step())  # before timing: a wrong result is never timed; warms up too
    times = time_step(benchmark, step, device)

    nbytes = pass_bytes(pass_name, case.numel, x.element_size(), case.channels)
    benchmark.extra_info.update(
        {
            "pass": pass_name,
            "backend": backend,
            "plan": plan,
            "shape": list(case.shape),
            "dtype": dtype_name(case.dtype),
            "layout": case.layout,
            "family": case.family,
            "bytes": nbytes,
        }
    )
    if times is not None:
        median, q1, q3 = times
        benchmark.extra_info.update(ms=median, ms_q1=q1, ms_q3=q3)
        benchmark.extra_info.update(throughput(nbytes, median, copy_bandwidth))
        benchmark.extra_info.update(user_timings_ms(step, device, median, UNCAPTURABLE.get(pass_name)))
        if backend not in ("torch", "reference", "torch.compile"):
            launched = triton_launches(step, device)
            if launched is not None:
                benchmark.extra_info["launches"] = launched
