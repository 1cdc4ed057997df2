"""``tritonbn.batch_norm``: torch.nn.functional.batch_norm's signature on tritonbn's dispatcher,
with an optional residual add and activation fused after the normalization, and a
memory-efficient mode that saves the output instead of the input."""

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
from .kernels.layout import output_format

__all__ = ["batch_norm", "check_fusion", "check_memory_efficient"]


def invertible(activation: str | None, negative_slope: float) -> bool:
    """Whether ``act`` can be undone from its output, as ``memory_efficient=True`` needs: None, or
    ``"leaky_relu"`` with a positive ``negative_slope``."""
    return activation is None or (activation == "leaky_relu" and negative_slope > 0)


def check_memory_efficient(memory_efficient: object, activation: str | None, negative_slope: float) -> None:
    """``memory_efficient`` a bool (TypeError); when True, ``activation`` must be invertible:
    None, or ``"leaky_relu"`` with a positive ``negative_slope`` (ValueError otherwise)."""
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"'memory_efficient' must be a bool, got {type(memory_efficient).__name__}")
    if not memory_efficient or invertible(activation, negative_slope):
        return
    if activation == "leaky_relu":
        raise ValueError(
            "memory_efficient=True with activation='leaky_relu' needs negative_slope > 0 (an "
            f"invertible activation), got negative_slope={negative_slope}"
        )
    raise ValueError(
        "memory_efficient=True recovers the input from the output, so the activation must be "
        f"invertible: None or 'leaky_relu' with negative_slope > 0, got activation={activation!r}"
    )


def check_fusion(
    input: torch.Tensor,
    residual: object,
    activation: str | None,
    negative_slope: float,
    memory_efficient: object,
) -> None:
    """The checks of the fused residual and of the memory-efficient mode (``input`` already
    checked to be a tensor): ``residual`` None or a tensor of ``input``'s shape, dtype and device;
    ``memory_efficient`` as ``check_memory_efficient``, and not together with a residual."""
    check_memory_efficient(memory_efficient, activation, negative_slope)
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(
            f"batch_norm: 'residual' must be a torch.Tensor or None, got {type(residual).__name__}"
        )
    if residual.shape != input.shape:
        raise ValueError(
            f"batch_norm: 'residual' must have the input's shape {tuple(input.shape)}, got "
            f"{tuple(residual.shape)}"
        )
    if residual.dtype != input.dtype:
        raise TypeError(
            f"batch_norm: 'residual' must have the input's dtype {input.dtype}, got {residual.dtype}"
        )
    if residual.device != input.device:
        raise ValueError(
            f"batch_norm: 'residual' must be on the input's device {input.device}, got {residual.device}"
        )
    if memory_efficient:
        raise ValueError(
            "batch_norm: memory_efficient=True does not combine with 'residual' (the backward "
            "would need the residual as well as the output, saving nothing); pass one or the other"
        )


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
    residual: torch.Tensor | None = None,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """Batch normalization with the same signature and semantics as
    ``torch.nn.functional.batch_norm``, differentiable in ``input``, ``weight``, ``bias`` (and
    ``residual``).

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

    Args:
        residual: a tensor of ``input``'s shape, dtype and device added before the activation:
            the result is ``act(batch_norm(input) + residual)`` (ResNet's block tail), computed in
            the same kernels, forward and backward; its gradient is ``dy·act'(...)``.
        memory_efficient: save the output instead of the input for the backward and recover
            x̂ = (act⁻¹(y) − β)/γ from it (InPlace-ABN's trick): one activation-sized tensor per
            layer, shared with the next layer's saved input. Needs an invertible activation (None,
            or ``"leaky_relu"`` with ``negative_slope > 0``) and no ``residual``; |γ| is floored
            at ``tritonbn.reference.MIN_WEIGHT`` = 1e-5 (sign kept, 0 → +1e-5) and dγ passes
            straight through the floor, so for |γ| ≥ 1e-5 the result is the plain call's and so
            are the gradients, up to the rounding of the saved output: x̂ recovered from y stored
            in ``input``'s dtype is off by about ulp(|y|)/|γ| an element, which shows in dγ where
            |β| is large next to |γ|, above all in half precision. The backward cannot be
            differentiated again (``create_graph``).

    Shape:
        - Input: (N, C) or (N, C, *); ``residual`` the same; output the same.

    Examples:
        >>> x, z = torch.randn(8, 6, 5, 5), torch.randn(8, 6, 5, 5)
        >>> y = tritonbn.batch_norm(x, None, None, training=True, activation="relu", residual=z)
        >>> y2 = tritonbn.batch_norm(x, None, None, training=True, activation="leaky_relu",
        ...                          memory_efficient=True)
    """
    if isinstance(momentum, torch.Tensor):
        momentum = momentum_value(momentum)
    check_input(input)
    check_activation(activation, negative_slope)
    check_fusion(input, residual, activation, negative_slope, memory_efficient)
    plan = select_plan(input, training)
    if plan.backend == "torch":
        return torch_fallback(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation,
            negative_slope,
            residual=residual,
            memory_efficient=memory_efficient,
        )
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return run_checked(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        activation=activation,
        negative_slope=negative_slope,
        plan=plan,
        residual=residual,
        memory_efficient=memory_efficient,
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
    *,
    residual: torch.Tensor | None = None,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """PyTorch's batch_norm (then the residual and the activation), the path of every CPU call
    (the memory-efficient mode runs ``reference.memory_efficient_batch_norm``): torch checks the
    tensors' shapes and dtypes itself, before it changes anything, so tritonbn adds only the checks
    torch does not make (hyperparameters; devices, which torch compares only after it has
    updated the running mean). When torch refuses a call, tritonbn's own checks run to raise the
    clearer error."""
    check_hyperparameters(training, momentum, eps)
    # On the CPU, is_cpu answers without building a torch.device per tensor.
    device = None if input.is_cpu else input.device
    suspect = (running_mean is None) != (running_var is None)
    for tensor in (running_mean, running_var, weight, bias):
        if tensor is not None and (
            not isinstance(tensor, torch.Tensor)
            or (not tensor.is_cpu if device is None else tensor.device != device)
        ):
            suspect = True
    if suspect or memory_efficient:
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if memory_efficient:
        return reference.memory_efficient_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation,
            negative_slope,
        )
    try:
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
        raise
    return torch_activation(y if residual is None else y + residual, activation, negative_slope)


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
    residual: torch.Tensor | None = None,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """``batch_norm`` for arguments that ``check_batch_norm_args`` (and ``check_activation``,
    ``check_fusion``) have already accepted; ``plan`` is ``select_plan(input, training)``,
    computed here when None."""
    if plan is None:
        plan = select_plan(input, training)
    if plan.backend in ("torch", "reference") and memory_efficient:
        return reference.memory_efficient_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation,
            negative_slope,
        )
    if plan.backend == "torch":
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch_activation(y if residual is None else y + residual, activation, negative_slope)
    # torch writes the output and the input's gradient in the input's suggested memory format; the
    # reference's elementwise ops and the kernels keep their input's strides, so where those differ
    # (plan.copies_input, decided in dispatch._decide) they run on a copy in torch's format.
    x = input
    if plan.copies_input or plan.backend == "reference":
        x = input.contiguous(memory_format=output_format(tuple(input.shape), tuple(input.stride())))
    if plan.backend == "reference":
        y = reference.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch_activation(y if residual is None else y + residual, activation, negative_slope)
    if residual is not None and residual.stride() != x.stride():
        # The kernels address x and the residual with one set of strides (a differentiable copy).
        residual = torch.empty_like(x).copy_(residual)
    # The kernels index per-channel tensors as dense vectors: strided ones go through a dense copy
    # (differentiable for the parameters; written back for the running statistics).
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    dense_mean = None if running_mean is None else running_mean.contiguous()
    dense_var = None if running_var is None else running_var.contiguous()
    y = triton_batch_norm(
        x,
        weight,
        bias,
        dense_mean,
        dense_var,
        training,
        momentum,
        eps,
        plan.kernel,
        activation,
        negative_slope,
        residual=residual,
        memory_efficient=memory_efficient,
    )
    for given, dense in ((running_mean, dense_mean), (running_var, dense_var)):
        if given is not None and dense is not given:
            given.copy_(dense)
    return y
