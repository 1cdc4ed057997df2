"""The autograd Function that runs the Triton kernels, forward and backward."""

from __future__ import annotations

from typing import Any

import torch

from tritonbn import kernels

from .dispatch import sm_count


def _like(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy`` with exactly ``x``'s strides (the kernels address both with one set of strides)."""
    if dy.stride() == x.stride():
        return dy
    return torch.empty_like(x).copy_(dy)


class TritonBatchNorm(torch.autograd.Function):
    """y = act(batch_norm(x)) on the Triton kernels; differentiable in input, weight and bias.

    Training saves the fp32 per-channel mean and invstd for the backward; eval saves the running
    statistics, and its backward is dx = dz·γ/sqrt(running_var + eps), not the training formula.
    With an activation the backward recomputes z = batch_norm(x) from the saved input, weight and
    bias and uses dz = dy·act'(z); no activation tensor is saved.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        plan: str,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> torch.Tensor:
        sms = sm_count(input.device)
        act = {"activation": activation, "negative_slope": negative_slope}
        if training:
            y, save = kernels.forward_train(
                input, weight, bias, running_mean, running_var, momentum, eps,
                plan=plan, sm_count=sms, **act,
            )
            ctx.save_for_backward(input, weight, bias, save)
        else:
            y = kernels.forward_eval(
                input, weight, bias, running_mean, running_var, eps, sm_count=sms, **act
            )
            ctx.save_for_backward(input, weight, bias, running_mean, running_var)
        ctx.training = training
        ctx.eps = eps
        ctx.plan = plan
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return (None,) * 11
        input = ctx.saved_tensors[0]
        dy = _like(grad_output, input)
        sms = sm_count(input.device)
        if ctx.training:
            _, weight, bias, save = ctx.saved_tensors
            dx, dw, db = kernels.backward_train(
                dy, input, weight, save, needs, plan=ctx.plan, sm_count=sms, bias=bias, **ctx.act
            )
        else:
            _, weight, bias, running_mean, running_var = ctx.saved_tensors
            dx, dw, db = kernels.backward_eval(
                dy, input, weight, running_mean, running_var, ctx.eps, needs, sm_count=sms,
                bias=bias, **ctx.act,
            )
        return dx, dw, db, None, None, None, None, None, None, None, None
