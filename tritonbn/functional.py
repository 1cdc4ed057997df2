"""``tritonbn.batch_norm``: torch.nn.functional.batch_norm's signature on tritonbn's dispatcher,
with an optional activation fused after the normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._checks import (
    check_activation,
    check_batch_norm_args,
    check_hyperparameters,
    check_input,
    momentum_value,
)
from .autograd import triton_batch_norm
from .dispatch import Plan, select_plan
from .kernels.activation_table import BY_NAME

__all__ = ["batch_norm"]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Batch normalization with the same signature and semantics as
    ``torch.nn.functional.batch_norm``, differentiable in ``input``, ``weight`` and ``bias``.

    In training, the biased batch variance normalizes ``input`` and the running statistics (when
    given) are updated in place afterwards with the unbiased one:
    ``running = (1 - momentum)·running + momentum·batch``. In eval the running statistics
    normalize. ``momentum`` may also be a 0-D tensor, as in torch. The output keeps the input's
    dtype and memory format. Bad arguments raise before anything is changed. ``tritonbn.explain``
    tells which backend and kernel plan run the call.

    ``activation`` (``"relu"``, ``"sigmoid"``, ``"leaky_relu"`` with ``negative_slope``,
    ``"silu"`` or ``"tanh"``) returns ``act(batch_norm(...))``: the Triton kernels apply it before
    storing the output and differentiate it in their backward from the saved input (no extra
    tensor is kept); the other backends apply the torch activation after their batch norm.
    """
    if isinstance(momentum, torch.Tensor):
        momentum = momentum_value(momentum)
    check_input(input)
    check_activation(activation, negative_slope)
    plan = select_plan(input, training)
    if plan.backend == "torch":
        return torch_fallback(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, activation, negative_slope)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return run_checked(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        activation=activation, negative_slope=negative_slope, plan=plan,
    )


def torch_fallback(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """PyTorch's batch_norm (then the activation), the path of every CPU call: torch checks the
    tensors' shapes and dtypes itself, before it changes anything, so tritonbn adds only the checks
    torch does not make (hyperparameters; devices, which torch compares only after it has
    updated the running mean). When torch refuses a call, tritonbn's own checks run to raise the
    clearer error."""
    check_hyperparameters(training, momentum, eps)
    device = input.device
    suspect = (running_mean is None) != (running_var is None)
    for tensor in (running_mean, running_var, weight, bias):
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.device != device):
            suspect = True
    if suspect:
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    try:
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
        raise
    return torch_activation(y, activation, negative_slope)


def torch_activation(y: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """``activation`` applied to ``y`` with torch's own ops (out of place)."""
    if activation is None:
        return y
    return BY_NAME[activation].apply(y, negative_slope)


def run_checked(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
    plan: Plan | None = None,
) -> torch.Tensor:
    """``batch_norm`` for arguments that ``check_batch_norm_args`` (and ``check_activation``) have
    already accepted; ``plan`` is ``select_plan(input, training)``, computed here when None."""
    if plan is None:
        plan = select_plan(input, training)
    if plan.backend == "torch":
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch_activation(y, activation, negative_slope)
    if plan.backend == "reference":
        y = reference.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
        return torch_activation(y, activation, negative_slope)
    x = input.contiguous() if plan.copies_input else input
    # The kernels index per-channel tensors as dense vectors: strided ones go through a dense copy
    # (differentiable for the parameters; written back for the running statistics).
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    dense_mean = None if running_mean is None else running_mean.contiguous()
    dense_var = None if running_var is None else running_var.contiguous()
    y = triton_batch_norm(
        x, weight, bias, dense_mean, dense_var, training, momentum, eps, plan.kernel,
        activation, negative_slope,
    )
    for given, dense in ((running_mean, dense_mean), (running_var, dense_var)):
        if given is not None and dense is not given:
            given.copy_(dense)
    return y
