"""The readable reference: the seed notebook's batch-norm algorithm in plain torch ops.

It follows PyTorch's conventions rather than the notebook's: ``momentum`` is the weight of the new
batch (the notebook's 0.9 on the old value is torch's 0.1 on the new one) and the running
variance receives the unbiased batch variance. It works in any floating dtype (half inputs are
computed in float32 and cast back, like torch), is differentiable by autograd, and is the oracle
of the test suite when run in float64.
"""

from __future__ import annotations

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from ._checks import check_batch_norm_args
from ._compat import forward_ad_active

__all__ = ["MIN_WEIGHT", "batch_norm", "floor_weight", "memory_efficient_batch_norm"]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization over every dimension but the channel dimension 1.

    Same signature and semantics as ``torch.nn.functional.batch_norm``. In training the batch
    statistics normalize ``input`` and then, if given, update the running statistics in place:
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the unbiased variance.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    compute_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(compute_dtype)
    reduce_dims = [0, *range(2, x.dim())]
    channel_shape = [1, x.shape[1]] + [1] * (x.dim() - 2)

    if training:
        mean = x.mean(dim=reduce_dims)
        var = ((x - mean.view(channel_shape)) ** 2).mean(dim=reduce_dims)
    else:
        mean = running_mean.to(compute_dtype)
        var = running_var.to(compute_dtype)

    x_hat = (x - mean.view(channel_shape)) / torch.sqrt(var.view(channel_shape) + eps)
    y = x_hat
    if weight is not None:
        y = y * weight.to(compute_dtype).view(channel_shape)
    if bias is not None:
        y = y + bias.to(compute_dtype).view(channel_shape)

    if training and running_mean is not None:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            unbiased_var = var.detach() * (count / (count - 1))
            running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(running_var.dtype))
    return y.to(input.dtype)


# The memory-efficient mode's floor on |γ|: the backward recovers x̂ = (act⁻¹(y) − β)/γ from the
# output, which needs γ ≠ 0. Weights with |γ| ≥ MIN_WEIGHT are used as they are (the module then
# computes exactly what torch's does); smaller ones become ±MIN_WEIGHT (sign kept, 0 → +).
MIN_WEIGHT = 1e-5


def floor_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with each |γ| < ``MIN_WEIGHT`` replaced by ±``MIN_WEIGHT`` (0 becomes
    +``MIN_WEIGHT``): the weight of the memory-efficient mode, whose backward divides by it.
    Not differentiable; the memory-efficient backward passes dγ straight through to γ."""
    with torch.no_grad():
        floor = torch.where(weight < 0, -MIN_WEIGHT, MIN_WEIGHT).to(weight.dtype)
        return torch.where(weight.abs() < MIN_WEIGHT, floor, weight)


def _invert(y: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """z = act⁻¹(y) for an invertible activation (None, leaky_relu with a positive slope)."""
    if activation is None:
        return y
    return torch.where(y > 0, y, y / negative_slope)


MEMORY_EFFICIENT_CREATE_GRAPH = (
    "batch_norm: memory_efficient=True saves only the output, so its backward cannot be "
    "differentiated again (create_graph=True); use memory_efficient=False"
)


class MemoryEfficientBatchNorm(torch.autograd.Function):
    """y = act(batch_norm(x)) in torch ops that saves y, not x, for the backward (InPlace-ABN's
    trick): with z = act⁻¹(y), x̂ = (z − β)/γ and dz = dy·act'(z),

        dβ = Σ dz,   dγ = Σ dz·x̂,   dx = γ·invstd·(dz − mean(dz) − x̂·mean(dz·x̂))   (training),
        dx = γ·invstd·dz                                                          (eval).

    γ is ``floor_weight(weight)``, and dγ is returned as the weight's gradient (straight through
    the floor). The torch and reference backends' memory-efficient path; float64 stays float64,
    half inputs compute in float32. Its backward raises under ``create_graph=True``: what it
    saved cannot give the second derivatives in x."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, negative_slope
    ):
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc = x.to(compute)
        reduce_dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if training:
            var, mean = torch.var_mean(xc, dim=reduce_dims, unbiased=False)
        else:
            mean, var = running_mean.to(compute), running_var.to(compute)
        invstd = torch.rsqrt(var + eps)
        gamma = None if weight is None else floor_weight(weight)
        z = (xc - mean.view(shape)) * invstd.view(shape)
        if gamma is not None:
            z = z * gamma.to(compute).view(shape)
        if bias is not None:
            z = z + bias.to(compute).view(shape)
        if activation == "leaky_relu":
            z = torch.nn.functional.leaky_relu(z, negative_slope)
        y = z.to(x.dtype)
        if training and running_mean is not None:
            count = x.numel() // x.shape[1]
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            unbiased = var * (count / max(count - 1, 1))
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        ctx.save_for_backward(y, gamma, bias, invstd)
        ctx.training, ctx.activation, ctx.negative_slope = training, activation, negative_slope
        return y

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(MEMORY_EFFICIENT_CREATE_GRAPH)
        y, gamma, bias, invstd = ctx.saved_tensors
        compute = invstd.dtype
        shape = [1, y.shape[1]] + [1] * (y.dim() - 2)
        reduce_dims = [0, *range(2, y.dim())]
        z = _invert(y.to(compute), ctx.activation, ctx.negative_slope)
        dz = grad_output.to(compute)
        if ctx.activation == "leaky_relu":
            dz = torch.where(y > 0, dz, dz * ctx.negative_slope)
        x_hat = z if bias is None else z - bias.to(compute).view(shape)
        scale = invstd
        if gamma is not None:
            x_hat = x_hat / gamma.to(compute).view(shape)
            scale = invstd * gamma.to(compute)
        grad_bias = dz.sum(reduce_dims)
        grad_weight = (dz * x_hat).sum(reduce_dims)
        if ctx.training:
            dz = dz - grad_bias.view(shape) / (y.numel() // y.shape[1])
            dz = dz - x_hat * (grad_weight / (y.numel() // y.shape[1])).view(shape)
        dx = (dz * scale.view(shape)).to(y.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            grad_weight.to(gamma.dtype) if need_w and gamma is not None else None,
            grad_bias.to(bias.dtype) if need_b and bias is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def memory_efficient_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``act(batch_norm(...))`` that saves its output instead of its input for the backward
    (``MemoryEfficientBatchNorm``); ``activation`` None or ``"leaky_relu"`` with a positive
    ``negative_slope``. Arguments must already be validated; an empty batch runs torch's batch
    norm (there is nothing to save), and so does a call inside a ``torch.func`` transform or a
    forward-mode AD level (which an autograd Function without ``setup_context`` and ``jvp``
    cannot serve): same values, nothing saved less."""
    transformed = not torch.compiler.is_compiling() and (
        is_functorch_wrapped_tensor(input) or forward_ad_active()
    )
    if input.numel() == 0 or transformed:
        # Nothing to save, or a transform (torch.func, forward-mode AD) that needs what an autograd
        # Function cannot give: torch's batch norm with the floored weight, dγ straight through.
        if weight is not None:
            weight = weight + (floor_weight(weight) - weight).detach()
        y = torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
        return y if activation is None else torch.nn.functional.leaky_relu(y, negative_slope)
    return MemoryEfficientBatchNorm.apply(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        float(momentum),
        float(eps),
        activation,
        float(negative_slope),
    )
