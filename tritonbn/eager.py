"""The modules' eager fast path: a call like one the module has already run goes straight to
its launch site.

A small layer's time in eager mode is the host's (its GPU work takes microseconds), and most of
that went to work whose outcome a training loop never changes: argument checks, the
dispatcher's decision, the launch site's key. A module therefore remembers, per *call
signature*, what its first such call decided (an :class:`EagerCall`); later calls with the same
signature skip the checks and the dispatcher and run :class:`EagerBatchNorm`, an autograd
Function with the fewest inputs that calls the prepared launch site.

The signature holds everything the skipped work depends on but the module's tensors: the input's
shape, strides, dtype, device and pointer alignment; the module's mode and options (training, eps,
momentum, activation); the requested backend; and the dispatcher's epoch, which moves when its
cached decisions are dropped (``tuning.reload``). The dtype and data pointer of each parameter and
buffer of the module are the call's *tensors*, compared on every run (in C++ when the glue runs
it): a moved, cast or reassigned tensor has another pointer, and the call goes back through the
checks. Calls that may not skip anything never look it up: under ``torch.compile`` or
``torch.jit.trace``, inside a ``torch.func`` transform or a forward-mode AD level, with a
residual or ``memory_efficient=True``.

Even that Function costs more host time than a whole ``torch.nn.BatchNorm`` layer, so where the
kernels run compiled (a GPU, not the interpreter) the first remembered call also records its
launches (``kernels.replay``) and hands the call to the C++ glue (``tritonbn.glue``): an autograd
Function in C++ that replays them, and falls back to :class:`GluePasses`, the same Python code,
for whatever it has no recording of. ``TRITONBN_GLUE=off`` keeps the Python Function.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from . import dispatch
from ._compat import forward_ad_active
from .autograd import _device_of, _like, differentiable_backward
from .kernels import workspace
from .kernels.normalization import RUNNING, SAVED, Normalization
from .kernels.runtime import interpreted

__all__ = ["EagerBatchNorm", "EagerCall", "EagerCalls", "GluePasses", "identity", "run", "signature"]

# Call signatures a module remembers before it starts over (a few batch sizes and modes).
MAX_CALLS = 16


class EagerCall:
    """What a module's checked call decided, for the calls with its signature: the launch site
    (``kernels.ops.Site``), whether it normalizes with the batch statistics (``training``) and
    passes the running statistics, eps, the activation and its slope, the fixed momentum (None
    for a cumulative average, computed a call) and whether the call counts a batch; then the C++
    glue's call object once one is attached (``glue``, run by ``glue_run``), and whether the next
    run should record its launches to attach one (``wants_glue``). ``tensors`` is the
    :func:`identity` of the module's weight, bias, running_mean, running_var and
    num_batches_tracked when the call was remembered, which a run must find again; ``x_layout``
    the input's strides and whether it was 16-byte aligned, which the launch site's backward
    takes for granted of the saved input too."""

    __slots__ = (
        "activation",
        "counts",
        "eps",
        "glue",
        "glue_run",
        "momentum",
        "running",
        "site",
        "slope",
        "tensors",
        "training",
        "wants_glue",
        "x_layout",
    )

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
        tensors: tuple[object, ...],
        x_layout: tuple[tuple[int, ...], bool],
    ) -> None:
        self.site = site
        self.tensors = tensors
        self.x_layout = x_layout
        self.training = training
        self.running = running
        self.eps = eps
        self.activation = activation
        self.slope = slope
        self.momentum = momentum
        self.counts = counts
        self.glue: Any = None
        self.glue_run: Any = None
        self.wants_glue = _glue().enabled() and not interpreted()


class EagerCalls(dict):
    """A module's remembered calls: a cache, so copies and pickles of the module start empty."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (EagerCalls, ())

    def remember(self, key: tuple[object, ...], call: EagerCall) -> None:
        if len(self) >= MAX_CALLS:
            self.clear()
        self[key] = call


def signature(module: torch.nn.Module, x: torch.Tensor) -> tuple[object, ...] | None:
    """The fast path's key of ``module(x)``, or None where the call must take the checked path
    every time (see the module docstring)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or module.memory_efficient:
        return None
    if is_functorch_wrapped_tensor(x) or torch._C._get_tracing_state() is not None or forward_ad_active():
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
        dispatch.requested_backend(device.type),
        dispatch.epoch(),
    )


def layout(x: torch.Tensor) -> tuple[tuple[int, ...], bool]:
    """What a launch site assumes of its input beyond shape and dtype: its strides, and whether
    it is 16-byte aligned (Triton specializes a pointer on that)."""
    return tuple(x.stride()), x.data_ptr() % 16 == 0


def as_laid_out(x: torch.Tensor, x_layout: tuple[tuple[int, ...], bool]) -> torch.Tensor:
    """``x``, or a copy of it laid out as ``x_layout`` says. The backward of a remembered call
    reads the saved input with the forward's strides and alignment, and a saved-tensor hook
    (``torch.autograd.graph.save_on_cpu(pin_memory=True)``, offloading) may give it back
    contiguous, or elsewhere; an aligned layout is met by a fresh tensor, and an unaligned one
    by any."""
    if laid_out(x, x_layout):
        return x
    return torch.empty_strided(x.shape, x_layout[0], dtype=x.dtype, device=x.device).copy_(x)


def laid_out(x: torch.Tensor, x_layout: tuple[tuple[int, ...], bool]) -> bool:
    """Whether ``x`` meets ``x_layout``: the same strides, and aligned if the layout is."""
    strides, aligned = x_layout
    return tuple(x.stride()) == strides and (x.data_ptr() % 16 == 0 or not aligned)


def identity(*tensors: torch.Tensor | None) -> tuple[object, ...]:
    """Each tensor's dtype and data pointer (None for an absent one): another tensor, or this one
    moved or cast, has another."""
    return tuple([None if t is None else (t.dtype, t.data_ptr()) for t in tensors])


class EagerBatchNorm(torch.autograd.Function):
    """Autograd over a remembered call's launch site: inputs (x, weight, bias, running_mean,
    running_var, counter, momentum, call), where ``counter`` is the module's num_batches_tracked
    when the call counts the batch (its first kernel adds 1) and None otherwise. The same
    formulas as ``autograd.TritonBatchNorm``, whose ``create_graph`` backward (torch ops,
    differentiable again) it shares."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        counter: torch.Tensor | None,
        momentum: float,
        call: EagerCall,
    ) -> torch.Tensor:
        inputs = (x, weight, bias, running_mean, running_var, counter)
        if call.wants_glue and not workspace.capturing(x.device):
            # The first run where the kernels run compiled: record it for the glue (never a run
            # captured into a CUDA graph, whose split kernels get the graph's own workspace).
            from .kernels.replay import recording

            with _device_of(x), recording() as notes:
                y, saved = _forward(call, *inputs, momentum)
            _attach_glue(call, notes, inputs, y, saved, momentum)
        else:
            with _device_of(x):
                y, saved = _forward(call, *inputs, momentum)
        ctx.save_for_backward(*saved)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[:3]
        if not (needs[0] or needs[1] or needs[2]):
            return (None,) * 8
        saved = list(ctx.saved_tensors)  # each read of saved_tensors unpacks them again
        with _device_of(saved[0]):
            dx, dw, db = _backward(ctx.call, grad_output, saved, needs)
        return dx, dw, db, None, None, None, None, None


def _forward(
    call: EagerCall,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    counter: torch.Tensor | None,
    momentum: float,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The forward on the call's launch site: (y, the tensors its backward needs)."""
    site = call.site
    if call.training:
        y, save = site.forward_train(
            x, weight, bias, running_mean, running_var, momentum, call.eps, call.slope, counter=counter
        )
        return y, [x, weight, bias, save]
    y = site.forward_eval(x, weight, bias, running_mean, running_var, call.eps, call.slope)
    return y, [x, weight, bias, running_mean, running_var]


def _backward(
    call: EagerCall,
    grad_output: torch.Tensor,
    saved: list[torch.Tensor | None],
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dγ, dβ) from the forward's ``saved`` tensors; with grad mode on (``create_graph``)
    as torch ops, differentiable again."""
    x, weight, bias = saved[:3]
    if torch.is_grad_enabled():
        dx, dw, db, _ = differentiable_backward(
            grad_output,
            (x, weight, bias),
            (*needs, False),
            training=call.training,
            eps=call.eps,
            activation=call.activation,
            negative_slope=call.slope,
            running=(None, None) if call.training else (saved[3], saved[4]),
        )
        return dx, dw, db
    x = as_laid_out(x, call.x_layout)
    dy = _like(grad_output, x)
    site = call.site
    if call.training:
        norm = Normalization(saved[3], None, weight, bias, SAVED, 0.0, site.activation, call.slope)
    else:
        norm = Normalization(saved[3], saved[4], weight, bias, RUNNING, call.eps, site.activation, call.slope)
    dx, dw, db, _ = site.derived((needs, dy.dtype, dy.data_ptr() & 15)).backward(dy, x, norm, needs)
    return dx, dw, db


def run(
    call: EagerCall,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    counter: torch.Tensor | None,
    momentum: float,
) -> torch.Tensor | None:
    """y = batch_norm(x) for a remembered call of the module whose parameters and buffers these
    are (``counter``: its num_batches_tracked), through the C++ glue when one is attached (and no
    launch hook watches: the glue calls the launchers directly), else :class:`EagerBatchNorm`.
    The call passes the running statistics and counts the batch (the first kernel adds 1 to the
    counter) as it was remembered to. None, with nothing done, when the tensors are not the
    call's (``EagerCall.tensors``)."""
    if call.glue is not None and not _hooks_installed():
        return call.glue_run(x, weight, bias, running_mean, running_var, momentum, call.glue, counter)
    if identity(weight, bias, running_mean, running_var, counter) != call.tensors:
        return None
    if not call.running:
        running_mean = running_var = None
    counted = counter if call.counts else None
    return EagerBatchNorm.apply(x, weight, bias, running_mean, running_var, counted, momentum, call)


def _hooks_installed() -> bool:
    """Whether a launch hook (a profiler) watches Triton's launches."""
    global _hooks_installed
    from .kernels.launch import _hooks_installed as installed

    _hooks_installed = installed  # imported once: later calls go straight to it
    return installed()


def _attach_glue(
    call: EagerCall,
    notes: list[tuple[object, ...]],
    inputs: tuple[torch.Tensor | None, ...],
    y: torch.Tensor,
    saved: list[torch.Tensor | None],
    momentum: float,
) -> None:
    """Give ``call`` a C++ glue call object that replays the forward recorded in ``notes``
    (nothing when the launches have no records or the glue cannot be built)."""
    from .kernels.replay import program

    call.wants_glue = False
    forward = program(notes, inputs, [y], saved, momentum)
    module = _glue().extension() if forward is not None else None
    if module is None:
        return
    current_stream = _stream_reader(inputs[0])
    passes = GluePasses(call)
    glue_call = module.Call(current_stream, current_stream(), passes.forward, passes.backward)
    glue_call.set_tensors(list(call.tensors), call.running, call.counts)
    glue_call.set_input_layout(*call.x_layout)
    glue_call.set_forward(*forward)
    call.glue, call.glue_run = glue_call, module.batch_norm


def _glue() -> Any:
    """``tritonbn.glue``, imported when first needed (``python -m tritonbn.glue`` runs it as a
    script, which must find it not yet imported)."""
    from . import glue

    return glue


def _stream_reader(x: torch.Tensor) -> Any:
    """() → the raw handle of the current stream of ``x``'s device, as Triton's launches read it."""
    from triton.runtime import driver

    active = driver.active
    device = x.device.index if x.is_cuda else active.get_current_device()
    return functools.partial(active.get_current_stream, device)


class GluePasses:
    """The Python passes the C++ glue falls back to, with what they need of an :class:`EagerCall`
    copied (not the call itself, which holds the glue: no reference cycle through C++)."""

    def __init__(self, call: EagerCall) -> None:
        self.call = EagerCall(
            call.site,
            training=call.training,
            running=call.running,
            eps=call.eps,
            activation=call.activation,
            slope=call.slope,
            momentum=call.momentum,
            counts=call.counts,
            tensors=call.tensors,
            x_layout=call.x_layout,
        )
        self.call.wants_glue = False

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        counter: torch.Tensor | None,
        momentum: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The forward the glue could not replay (another stream, or a CUDA graph being
        captured on its own): (y, saved)."""
        with _device_of(x):
            return _forward(self.call, x, weight, bias, running_mean, running_var, counter, momentum)

    def backward(
        self, glue_call: Any, grad_output: torch.Tensor, saved: list[torch.Tensor | None], needs_bits: int
    ) -> list[torch.Tensor | None]:
        """The backward the glue has no recording of (or runs no recording of: while a CUDA
        graph is captured): run it, recorded, and give the glue the program, keyed by the
        gradients asked for and the gradient's alignment — unless captured."""
        from .kernels.replay import program, recording

        needs = (bool(needs_bits & 1), bool(needs_bits & 2), bool(needs_bits & 4))
        x = saved[0]
        stream = _stream_reader(x)
        with _device_of(x), recording() as notes:
            dx, dw, db = _backward(self.call, grad_output, saved, needs)
        # A program replays the launches on the tensors it was given: only one that ran on the
        # saved input itself (laid out as the forward's, not copied) and on dy as it came.
        dy_matches = grad_output.dtype == x.dtype and grad_output.stride() == x.stride()
        x_matches = laid_out(x, self.call.x_layout)
        if dy_matches and x_matches and not torch.is_grad_enabled() and not workspace.capturing(x.device):
            found = program(notes, [grad_output, *saved], [dx, dw, db])
            if found is not None and stream() == glue_call.stream:
                allocations, launches, outputs, _ = found
                aligned = grad_output.data_ptr() % 16 == 0
                glue_call.set_backward(needs_bits | aligned << 3, allocations, launches, outputs)
        return [dx, dw, db]
