"""The Triton kernels as PyTorch operators, with their autograd formulas.

The autograd Function ``TritonBatchNorm`` calls the kernel entry points directly in eager mode
(the host time of a small layer is the time a user waits). For ``torch.compile`` and
``torch.export`` three custom ops (``torch.ops.tritonbn.*``) wrap the same entry points:
``forward_train`` (which updates the running statistics in place, declared as a mutation),
``forward_eval`` and ``backward``. Each has a fake (meta) implementation, so ``torch.compile``
traces a model that uses tritonbn without graph breaks and without looking inside the Triton
launches. Nothing here synchronizes with the host, so the CUDA path can be captured in a CUDA
graph.

Training saves the fp32 per-channel mean and invstd for the backward; eval saves the running
statistics, and its backward is dx = dz·γ/sqrt(running_var + eps), not the training formula.
With an activation the backward recomputes z = batch_norm(x) from the saved input, weight and bias
and uses dz = dy·act'(z); no activation tensor is saved.

An optional ``residual`` r gives y = act(batch_norm(x) + r) in the same kernels; with an activation
the residual is saved and the backward recomputes u = z + r, returning dr = dy·act'(u) (without
one, dr = dy). ``memory_efficient`` saves the output y instead of x and the backward recovers
x̂ from y (InPlace-ABN's trick; invertible activations only), with the weight's magnitude floored
at ``reference.MIN_WEIGHT`` (``reference.floor_weight``) so that y can be inverted.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from tritonbn import kernels

from .dispatch import RUNTIME_PLAN, runtime_plan, sm_count
from .kernels.plans import PlanName
from .reference import MEMORY_EFFICIENT_CREATE_GRAPH, floor_weight

__all__ = ["TritonBatchNorm", "triton_batch_norm"]


def _like(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy`` with exactly ``x``'s strides (the kernels address both with one set of strides)."""
    if dy.stride() == x.stride():
        return dy
    return torch.empty_like(x).copy_(dy)


# The ops are declared with torch.library.define and implemented per device type, not with
# torch.library.custom_op, whose calls go through more Python (its wrappers at the dispatcher's
# autograd keys, an aliasing check of the outputs) before the implementation: a cost paid at every
# BatchNorm call of a graph compiled without CUDA graphs. bench/host_overhead.py --compiled, on
# the stand-in driver: 89-115 µs a layer, forward and backward (bench/results/host-overhead/
# cpu-standin-2026-11-30-1945.json); the same script on commit 45b4162, whose ops were custom_ops:
# 114-143. The autograd formula lives in TritonBatchNorm: the ops need none.
torch.library.define(
    "tritonbn::forward_train",
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "float momentum, float eps, str plan, str? activation, float negative_slope, "
    "Tensor? residual=None) -> (Tensor, Tensor)",
)
torch.library.define(
    "tritonbn::forward_eval",
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
    'str? activation, float negative_slope, str plan="eval", Tensor? residual=None) -> Tensor',
)
torch.library.define(
    "tritonbn::backward",
    "(Tensor grad_output, Tensor x, Tensor? weight, Tensor? bias, Tensor? save, "
    "Tensor? running_mean, Tensor? running_var, float eps, str plan, str? activation, "
    "float negative_slope, bool need_input, bool need_weight, bool need_bias, "
    "Tensor? residual=None, bool need_residual=False, bool from_output=False) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
# Devices the kernels run on: CUDA, and CPU tensors under Triton's interpreter.
_KERNEL_DEVICES = ("cpu", "cuda")


def _forward_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    plan: str,
    activation: str | None,
    negative_slope: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, save = kernels.forward_train(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps,
        plan=_resolved(plan, x, training=True),
        sm_count=sm_count(x.device),
        activation=activation,
        negative_slope=negative_slope,
        residual=residual,
    )
    return y, save[:SAVED_ROWS]


# The rows of a training forward's save that its backward reads: the mean and invstd (the split
# plans' folded scale and shift, rows 2 and 3, served their forward's normalize pass). Every plan
# returns these, so the fake need not know the plan, which under torch.compile is chosen at run
# time: no copy to a common shape.
SAVED_ROWS = 2


def _resolved(plan: str, x: torch.Tensor, training: bool) -> str:
    """``plan``, or the plan the dispatcher picks for ``x`` where the graph left it to run time
    (torch.compile with dynamic sizes): the same sizes always get the same plan."""
    return runtime_plan(x, training) if plan == RUNTIME_PLAN else plan


torch.library.impl("tritonbn::forward_train", _KERNEL_DEVICES, _forward_train)


@torch.library.register_fake("tritonbn::forward_train")
def _(
    x, weight, bias, running_mean, running_var, momentum, eps, plan, activation, negative_slope, residual=None
):
    return torch.empty_like(x), x.new_empty((SAVED_ROWS, x.shape[1]), dtype=torch.float32)


def _forward_eval(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    activation: str | None,
    negative_slope: float,
    plan: str = "eval",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    return kernels.forward_eval(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        sm_count=sm_count(x.device),
        activation=activation,
        negative_slope=negative_slope,
        plan=_resolved(plan, x, training=False),
        residual=residual,
    )


torch.library.impl("tritonbn::forward_eval", _KERNEL_DEVICES, _forward_eval)


@torch.library.register_fake("tritonbn::forward_eval")
def _(
    x, weight, bias, running_mean, running_var, eps, activation, negative_slope, plan="eval", residual=None
):
    return torch.empty_like(x)


def _backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    save: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    plan: str,
    activation: str | None,
    negative_slope: float,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    residual: torch.Tensor | None = None,
    need_residual: bool = False,
    from_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ, d residual); an input whose gradient was not asked for gets an empty tensor.
    ``save`` is the training forward's (training backward), or None with the running statistics
    (eval); ``x`` is the forward's output when ``from_output`` (memory-efficient)."""
    dy = _like(grad_output, x)
    needs = (need_input, need_weight, need_bias)
    plan = _resolved(plan, x, training=save is not None)
    act = {
        "bias": bias,
        "activation": activation,
        "negative_slope": negative_slope,
        "residual": residual,
        "need_residual": need_residual,
        "from_output": from_output,
    }
    if save is not None:
        grads = kernels.backward_train(
            dy, x, weight, save, needs, plan=plan, sm_count=sm_count(x.device), **act
        )
    else:
        grads = kernels.backward_eval(
            dy,
            x,
            weight,
            running_mean,
            running_var,
            eps,
            needs,
            sm_count=sm_count(x.device),
            plan=plan,
            **act,
        )
    if not need_residual:
        grads = (*grads, None)
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


torch.library.impl("tritonbn::backward", _KERNEL_DEVICES, _backward)


@torch.library.register_fake("tritonbn::backward")
def _(
    grad_output,
    x,
    weight,
    bias,
    save,
    running_mean,
    running_var,
    eps,
    plan,
    activation,
    negative_slope,
    need_input,
    need_weight,
    need_bias,
    residual=None,
    need_residual=False,
    from_output=False,
):
    param_dtype = weight.dtype if weight is not None else torch.float32
    channels = x.shape[1]
    return (
        torch.empty_like(x) if need_input else x.new_empty(0),
        x.new_empty(channels if need_weight else 0, dtype=param_dtype),
        x.new_empty(channels if need_bias else 0, dtype=param_dtype),
        torch.empty_like(x) if need_residual else x.new_empty(0),
    )


def _eager() -> bool:
    """Whether to call the kernels directly: not when torch.compile traces the call (it sees the
    custom ops, whose dispatch in eager mode would cost host time at every call). torch.jit.trace
    never gets here: the dispatcher gives traced calls to PyTorch's own batch_norm."""
    return not torch.compiler.is_compiling()


_SAME_DEVICE = contextlib.nullcontext()


def _device_of(x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _SAME_DEVICE


def differentiable_backward(
    grad_output: torch.Tensor,
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, bool, bool, bool],
    *,
    training: bool,
    eps: float,
    activation: str | None,
    negative_slope: float,
    running: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """The backward as torch ops on the saved tensors, for ``create_graph=True`` (a gradient
    penalty, MAML): the result is itself differentiable, twice and more, as torch's is.

    ``inputs`` are the saved (x, weight, bias), ``running`` the running statistics an eval
    forward normalized with, ``residual`` the saved one (saved only with an activation); ``needs``
    says which of (dx, dγ, dβ, d residual) to return (None for the others)."""
    from .functional import torch_activation

    x, weight, bias = inputs
    if training:
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    else:
        y = F.batch_norm(x, running[0], running[1], weight, bias, False, 0.0, eps)
    need_residual = needs[3]
    if residual is not None:
        y = y + residual
    y = torch_activation(y, activation, negative_slope)
    sources = (*inputs, residual)
    wanted_needs = (*needs[:3], need_residual and residual is not None)
    wanted = [t for t, need in zip(sources, wanted_needs, strict=True) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad_output, create_graph=True) if wanted else ())
    result = tuple(next(grads) if need else None for need in wanted_needs)
    if need_residual and residual is None:  # no activation: d residual = dy
        result = (*result[:3], grad_output)
    return result


class TritonBatchNorm(torch.autograd.Function):
    """Autograd over the kernels. In eager mode it calls the launchers of ``tritonbn.kernels``
    directly; under torch.compile or torch.jit.trace it calls the custom ops, which those see.
    ``forward_train`` mutates the running statistics, which a ``register_autograd`` formula may
    not do, so the formula lives in this Function (dynamo traces it, the ops inside stay opaque).
    A backward with ``create_graph=True`` runs as torch ops, differentiable again."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        plan: str,
        activation: str | None,
        negative_slope: float,
        residual: torch.Tensor | None = None,
        memory_efficient: bool = False,
    ) -> torch.Tensor:
        if memory_efficient and weight is not None:
            weight = floor_weight(weight)  # dγ passes straight through the floor
        if _eager():
            with _device_of(x):
                if training:
                    y, save = kernels.forward_train(
                        x,
                        weight,
                        bias,
                        running_mean,
                        running_var,
                        momentum,
                        eps,
                        plan=plan,
                        sm_count=sm_count(x.device),
                        activation=activation,
                        negative_slope=negative_slope,
                        residual=residual,
                    )
                else:
                    y = kernels.forward_eval(
                        x,
                        weight,
                        bias,
                        running_mean,
                        running_var,
                        eps,
                        sm_count=sm_count(x.device),
                        activation=activation,
                        negative_slope=negative_slope,
                        plan=plan,
                        residual=residual,
                    )
        elif training:
            y, save = torch.ops.tritonbn.forward_train.default(
                x,
                weight,
                bias,
                running_mean,
                running_var,
                momentum,
                eps,
                plan,
                activation,
                negative_slope,
                residual,
            )
        else:
            y = torch.ops.tritonbn.forward_eval.default(
                x, weight, bias, running_mean, running_var, eps, activation, negative_slope, plan, residual
            )
        # Memory-efficient: the output (which the next layer keeps anyway) instead of the input.
        kept = y if memory_efficient else x
        # The residual enters the backward only through act'(z + residual).
        residual = residual if activation is not None else None
        if training:
            ctx.save_for_backward(kept, weight, bias, save, residual)
        else:
            ctx.save_for_backward(kept, weight, bias, running_mean, running_var, residual)
        ctx.memory_efficient = memory_efficient
        ctx.training, ctx.eps, ctx.plan = training, eps, plan
        ctx.activation, ctx.negative_slope = activation, negative_slope
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_residual = ctx.needs_input_grad[11]
        unused = (None,) * 8
        if not (need_input or need_weight or need_bias or need_residual):
            return (None, None, None, *unused, None, None)
        *saved, residual = ctx.saved_tensors
        if torch.is_grad_enabled():
            if ctx.memory_efficient:
                raise RuntimeError(MEMORY_EFFICIENT_CREATE_GRAPH)
            *grads, dres = differentiable_backward(
                grad_output,
                tuple(saved[:3]),
                (need_input, need_weight, need_bias, need_residual),
                training=ctx.training,
                eps=ctx.eps,
                activation=ctx.activation,
                negative_slope=ctx.negative_slope,
                running=(None, None) if ctx.training else tuple(saved[3:5]),
                residual=residual,
            )
            return (*grads, *unused, dres, None)
        if residual is None and need_residual and not (need_input or need_weight or need_bias):
            return (None, None, None, *unused, grad_output, None)  # no activation: dr = dy
        if ctx.training:
            x, weight, bias, save = saved
            running_mean = running_var = None
        else:
            x, weight, bias, running_mean, running_var = saved
            save = None
        # The kernels write d residual only when they need the residual (with an activation).
        kernel_dres = need_residual and residual is not None
        if _eager():
            dy = _like(grad_output, x)
            needs = (need_input, need_weight, need_bias)
            act = {
                "bias": bias,
                "activation": ctx.activation,
                "negative_slope": ctx.negative_slope,
                "residual": residual,
                "need_residual": kernel_dres,
                "from_output": ctx.memory_efficient,
            }
            with _device_of(x):
                if save is not None:
                    dx, dw, db, *dres = kernels.backward_train(
                        dy, x, weight, save, needs, plan=ctx.plan, sm_count=sm_count(x.device), **act
                    )
                else:
                    dx, dw, db, *dres = kernels.backward_eval(
                        dy,
                        x,
                        weight,
                        running_mean,
                        running_var,
                        ctx.eps,
                        needs,
                        sm_count=sm_count(x.device),
                        plan=ctx.plan,
                        **act,
                    )
            dres = dres[0] if dres else None
        else:
            dx, dw, db, dres = torch.ops.tritonbn.backward.default(
                grad_output,
                x,
                weight,
                bias,
                save,
                running_mean,
                running_var,
                ctx.eps,
                ctx.plan,
                ctx.activation,
                ctx.negative_slope,
                need_input,
                need_weight,
                need_bias,
                residual,
                kernel_dres,
                ctx.memory_efficient,
            )
        if need_residual and residual is None:
            dres = grad_output
        return (
            dx if need_input else None,
            dw if need_weight else None,
            db if need_bias else None,
            *unused,
            dres if need_residual else None,
            None,
        )


def triton_batch_norm(
    x: torch.Tensor,
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
    residual: torch.Tensor | None = None,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """y = act(batch_norm(x) [+ residual]) on the Triton kernels with kernel ``plan``;
    differentiable in ``x``, ``weight``, ``bias`` and ``residual`` (which must have ``x``'s shape
    and strides). ``memory_efficient`` saves y instead of x (see the module docstring). Arguments
    must already be validated. ``plan`` is a plan name,
    a plan token with tunables, or the dispatcher's ``PlanName`` (whose token is used: the custom
    ops see a plain string)."""
    if isinstance(plan, PlanName):
        plan = plan.token
    return TritonBatchNorm.apply(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        float(momentum),
        float(eps),
        plan,
        activation,
        float(negative_slope),
        residual,
        bool(memory_efficient),
    )
