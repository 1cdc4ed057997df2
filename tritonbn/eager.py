"""The modules' eager fast path: a call like one the module has already run goes straight to
its launch site.

A small layer's time in eager mode is the host's (its GPU work takes microseconds), and most of
that went to work whose outcome a training loop never changes: argument checks, the
dispatcher's decision, the launch site's key. A module therefore remembers, per *call
signature*, what its first such call decided (an :class:`EagerCall`); later calls with the same
signature skip the checks and the dispatcher and run :class:`EagerBatchNorm`, an autograd
Function with the fewest inputs that calls the prepared launch site.

The signature holds everything the skipped work depends on: the input's shape, strides, dtype,
device and pointer alignment; the module's mode and options (training, eps, momentum, activation);
the dtype and data pointer of each parameter and buffer (a moved, cast or reassigned tensor has
another pointer: its next call is checked again); the requested backend; and the dispatcher's
epoch, which moves when its cached decisions are dropped (``tuning.reload``). Calls that may not
skip anything never look it up: under ``torch.compile`` or ``torch.jit.trace``, inside a
``torch.func`` transform, with a residual or ``memory_efficient=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from . import dispatch
from .autograd import _device_of, _like, differentiable_backward
from .kernels.normalization import RUNNING, SAVED, Normalization

__all__ = ["EagerBatchNorm", "EagerCall", "EagerCalls", "signature"]

# Call signatures a module remembers before it starts over (a few batch sizes and modes).
MAX_CALLS = 16


class EagerCall:
    """What a module's checked call decided, for the calls with its signature: the launch site
    (``kernels.ops.Site``), whether it normalizes with the batch statistics (``training``) and
    passes the running statistics, eps, the activation and its slope, the fixed momentum (None
    for a cumulative average, computed a call) and whether the call counts a batch."""

    __slots__ = ("activation", "counts", "eps", "momentum", "running", "site", "slope", "training")

    def __init__(
        self,
        site: Any,
        *,
        training: bool,
        running: bool,
        eps: float,
        activation: str | None,
        slope: float,
        momentum: float | None,
        counts: bool,
    ) -> None:
        self.site = site
        self.training = training
        self.running = running
        self.eps = eps
        self.activation = activation
        self.slope = slope
        self.momentum = momentum
        self.counts = counts


class EagerCalls(dict):
    """A module's remembered calls: a cache, so copies and pickles of the module start empty."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (EagerCalls, ())

    def remember(self, key: tuple[object, ...], call: EagerCall) -> None:
        if len(self) >= MAX_CALLS:
            self.clear()
        self[key] = call


def signature(
    module: torch.nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> tuple[object, ...] | None:
    """The fast path's key of ``module(x)`` with these parameters and buffers, or None where the
    call must take the checked path every time (see the module docstring)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or module.memory_efficient:
        return None
    if is_functorch_wrapped_tensor(x) or torch._C._get_tracing_state() is not None:
        return None
    device = x.device
    return (
        x.shape,
        x.stride(),
        x.dtype,
        device,
        x.data_ptr() & 15,
        module.training,
        module.track_running_stats,
        module.momentum,
        module.eps,
        module.activation,
        module.negative_slope,
        # A tensor's dtype and address: another tensor, or this one moved or cast, has another.
        None if weight is None else (weight.dtype, weight.data_ptr()),
        None if bias is None else (bias.dtype, bias.data_ptr()),
        None if running_mean is None else (running_mean.dtype, running_mean.data_ptr()),
        None if running_var is None else (running_var.dtype, running_var.data_ptr()),
        dispatch.requested_backend(device.type),
        dispatch.epoch(),
    )


class EagerBatchNorm(torch.autograd.Function):
    """Autograd over a remembered call's launch site: inputs (x, weight, bias, running_mean,
    running_var, momentum, call). The same formulas as ``autograd.TritonBatchNorm``, whose
    ``create_graph`` backward (torch ops, differentiable again) it shares."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        call: EagerCall,
    ) -> torch.Tensor:
        site = call.site
        with _device_of(x):
            if call.training:
                y, save = site.forward_train(
                    x, weight, bias, running_mean, running_var, momentum, call.eps, call.slope
                )
                ctx.save_for_backward(x, weight, bias, save)
            else:
                y = site.forward_eval(x, weight, bias, running_mean, running_var, call.eps, call.slope)
                ctx.save_for_backward(x, weight, bias, running_mean, running_var)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[:3]
        if not (needs[0] or needs[1] or needs[2]):
            return (None,) * 7
        call = ctx.call
        site = call.site
        saved = ctx.saved_tensors
        x, weight, bias = saved[:3]
        if torch.is_grad_enabled():
            running = (None, None) if call.training else saved[3:5]
            dx, dw, db, _ = differentiable_backward(
                grad_output,
                (x, weight, bias),
                (*needs, False),
                training=call.training,
                eps=call.eps,
                activation=call.activation,
                negative_slope=call.slope,
                running=running,
            )
            return dx, dw, db, None, None, None, None
        dy = _like(grad_output, x)
        if call.training:
            norm = Normalization(saved[3], None, weight, bias, SAVED, 0.0, site.activation, call.slope)
        else:
            norm = Normalization(
                saved[3], saved[4], weight, bias, RUNNING, call.eps, site.activation, call.slope
            )
        launches = site.derived((needs, dy.dtype, dy.data_ptr() & 15))
        with _device_of(x):
            dx, dw, db, _ = launches.backward(dy, x, norm, needs)
        return dx, dw, db, None, None, None, None
