"""Shared machinery of the kernel tests: run one batch-norm step (optionally with a fused
activation) on a backend and on the float64 reference, and compare outputs, gradients and running
statistics with dtype-scaled tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import reference

# (rtol, atol) for outputs and dx, by input dtype: fp32 is exact to a few ulps of the O(1) result,
# fp16 keeps 11 bits and bf16 8 bits of the stored output.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def torch_activation(y: torch.Tensor, activation: str | None, negative_slope: float = 0.01):
    """The oracle of a fused activation: torch's own op applied after batch norm."""
    if activation is None:
        return y
    ops = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "leaky_relu": lambda t: F.leaky_relu(t, negative_slope),
        "silu": F.silu,
        "tanh": torch.tanh,
    }
    return ops[activation](y)


@dataclass
class Step:
    """What one forward + backward produced."""

    y: torch.Tensor
    dx: torch.Tensor | None
    dw: torch.Tensor | None
    db: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


def make_inputs(shape, dtype, device, *, channels_last=False, offset=0.0, scale=1.0, seed=0):
    """Input of ``shape`` with a mean ``offset`` and spread ``scale``, stored in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = (offset + scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if channels_last:
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=memory_format)
    channels = shape[1]
    weight = 1 + 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    running_mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    running_var = 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return {
        "x": x.to(device),
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
        "grad": grad.to(device),
    }


def run_step(
    inputs,
    *,
    backend,
    plan=None,
    training=True,
    param_dtype=torch.float32,
    affine=True,
    running=True,
    momentum=0.1,
    eps=1e-5,
    need_input=True,
    need_params=True,
    compute_dtype=None,
    activation=None,
    negative_slope=0.01,
) -> Step:
    """One forward (+ backward of <grad, y>) on ``backend``; float64 params/stats when the input
    is float64 (the reference), else ``param_dtype``. ``activation`` is fused on the tritonbn
    backends and applied with torch's op after ``tritonbn.reference`` on ``"reference"``."""
    x_src = inputs["x"]
    dtype = compute_dtype or x_src.dtype
    pdtype = torch.float64 if dtype == torch.float64 else param_dtype
    device = x_src.device
    x = x_src.to(dtype).detach().requires_grad_(need_input)

    # Fresh copies: the step must neither see nor change another step's tensors.
    def fresh(name):
        return inputs[name].to(device, pdtype, copy=True)

    weight = fresh("weight").requires_grad_(need_params) if affine else None
    bias = fresh("bias").requires_grad_(need_params) if affine else None
    running_mean = fresh("running_mean") if running else None
    running_var = fresh("running_var") if running else None
    if backend == "reference":
        y = reference.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        y = torch_activation(y, activation, negative_slope)
    else:
        with tritonbn.backend(backend, plan=plan):
            y = tritonbn.batch_norm(
                x,
                running_mean,
                running_var,
                weight,
                bias,
                training,
                momentum,
                eps,
                activation=activation,
                negative_slope=negative_slope,
            )
    wants = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    if wants:
        torch.autograd.backward(y, inputs["grad"].to(dtype))
    return Step(
        y=y.detach(),
        dx=x.grad if need_input else None,
        dw=weight.grad if (affine and need_params) else None,
        db=bias.grad if (affine and need_params) else None,
        running_mean=running_mean,
        running_var=running_var,
    )


def reference_step(inputs, **options) -> Step:
    """The float64 reference on the same (already rounded) input values."""
    return run_step(inputs, backend="reference", compute_dtype=torch.float64, **options)


def assert_step_close(
    got: Step, want: Step, dtype: torch.dtype, *, reduced: int, param_dtype: torch.dtype = torch.float32
) -> None:
    """Compare every field; dγ and dβ are sums over ``reduced`` elements, so their absolute
    tolerance grows with sqrt(reduced) (random-walk rounding). Running statistics stored in a half
    ``param_dtype`` are compared at that dtype's precision."""
    rtol, atol = TOLERANCES[dtype]

    def close(name, a, b, rtol_, atol_):
        if b is None:
            assert a is None, f"{name}: expected None"
            return
        assert a is not None, f"{name}: missing"
        assert torch.isfinite(a.float()).all(), f"{name}: non-finite values (an unwritten element?)"
        torch.testing.assert_close(
            a.double().cpu(), b.double().cpu(), rtol=rtol_, atol=atol_, msg=lambda m: f"{name}: {m}"
        )

    close("y", got.y, want.y, rtol, atol)
    close("dx", got.dx, want.dx, rtol, atol)
    grow = max(1.0, reduced**0.5)
    close("dweight", got.dw, want.dw, rtol, atol * grow)
    close("dbias", got.db, want.db, rtol, atol * grow)
    if param_dtype != torch.float32:
        stat_rtol, stat_atol = TOLERANCES[param_dtype]
    else:
        stat_rtol = stat_atol = 1e-5 if dtype == torch.float32 else 1e-4
    close("running_mean", got.running_mean, want.running_mean, stat_rtol, stat_atol)
    close("running_var", got.running_var, want.running_var, stat_rtol, stat_atol)
