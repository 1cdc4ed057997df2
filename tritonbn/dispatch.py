"""The dispatcher: which backend and which kernel plan runs a batch-norm call, and why.

Backends: ``"triton"`` (the fused kernels of ``tritonbn.kernels``), ``"torch"`` (PyTorch's own
``torch.nn.functional.batch_norm``) and ``"reference"`` (``tritonbn.reference``). The choice is
``auto`` unless the environment variable ``TRITONBN_BACKEND`` or the context manager
:func:`backend` says otherwise; ``TRITONBN_PLAN`` (or ``backend("triton", plan=...)``) forces a
kernel plan wherever a Triton kernel runs. The decision uses shapes, dtype, layout and the GPU
alone, never tensor values, so it is the same for every call of a given shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from tritonbn.kernels.layout import (
    Layout,
    describe_strides,
    format_strides,
    output_format,
    same_strides,
)
from tritonbn.kernels.plans import KERNEL_PLANS, PLANS, KernelPlan, PlanName, fused_tile_elements
from tritonbn.kernels.runtime import (
    TRITON_MISSING,
    interpreted,
    launches_cpu_tensors,
    stand_in_sm_count,
)

from . import tuning as _tuning
from ._compat import forward_ad_active

BACKENDS = ("auto", "triton", "torch", "reference")

__all__ = ["BACKENDS", "PLANS", "Plan", "backend", "explain", "select_plan"]

_override: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "tritonbn_backend", default=None
)


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _check_plan(name: str | None, source: str) -> str | None:
    if name is not None and name not in PLANS:
        raise ValueError(f"{source} must be one of {', '.join(PLANS)}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str, plan: str | None = None) -> Iterator[None]:
    """Run the batch-norm calls inside the ``with`` block on backend ``name`` (and kernel ``plan``).

    Takes precedence over the ``TRITONBN_BACKEND`` and ``TRITONBN_PLAN`` environment variables;
    blocks nest, the innermost wins. Under ``torch.compile`` the choice is read once, when a graph
    is traced.

    Args:
        name (str): ``"auto"`` (the dispatcher chooses: the Triton kernels for CUDA tensors,
            PyTorch's own batch_norm elsewhere), ``"triton"``, ``"torch"`` or ``"reference"``.
        plan (str, optional): a kernel plan of :data:`PLANS` to force, only with ``"triton"``.

    Raises:
        ValueError: an unknown ``name`` or ``plan``, or a ``plan`` with another backend.

    Examples::

        >>> x = torch.randn(8, 6, 24, 24)
        >>> with tritonbn.backend("reference"):
        ...     y = tritonbn.batch_norm(x, None, None, training=True)
        >>> with tritonbn.backend("triton", plan="split-welford"):  # on a GPU
        ...     y = tritonbn.BatchNorm2d(6).cuda()(x.cuda())
    """
    _check_backend(name, "backend name")
    _check_plan(plan, "plan")
    if plan is not None and name != "triton":
        raise ValueError(f"a kernel plan can only be forced with backend 'triton', got {name!r}")
    token = _override.set((name, plan))
    try:
        yield
    finally:
        _override.reset(token)


@torch.compiler.assume_constant_result
def _current_override() -> tuple[str, str | None] | None:
    """The innermost ``backend()`` block's (backend, plan). Under torch.compile it is read once,
    when a graph is traced (older dynamo cannot trace ``ContextVar.get``), like every decision of
    the dispatcher."""
    return _override.get()


def requested_backend(device_type: str) -> tuple[str, str | None, str]:
    """(backend, forced plan, where the choice came from) for a tensor on ``device_type``.

    TRITONBN_PLAN is read only where a Triton kernel may run (backend ``triton``, or ``auto`` on
    CUDA): even through :func:`_environment`, a read is a cost on every call of the CPU fallback.
    """
    override = _current_override()
    if override is not None:
        return override[0], override[1], "tritonbn.backend()"
    name = _check_backend(_environment("TRITONBN_BACKEND") or "auto", "TRITONBN_BACKEND")
    plan = None
    if name == "triton" or (name == "auto" and device_type == "cuda"):
        plan = _check_plan(_environment("TRITONBN_PLAN") or None, "TRITONBN_PLAN")
    return name, plan, "TRITONBN_BACKEND" if name != "auto" else "default"


# CPython's os.environ keeps the variables in a dict by encoded name (its ``_data``), the same
# dict for the life of the process; os.environ[...] = ... and monkeypatch.setenv update it in place.
_ENVIRON = os.environ
_ENVIRON_DATA: dict | None = getattr(_ENVIRON, "_data", None) if hasattr(_ENVIRON, "encodekey") else None
_encoded_names: dict[str, object] = {}


def _environment(name: str) -> str | None:
    """``os.environ.get(name)``, read in the dict where CPython keeps it: ``get`` of an unset
    variable raises and catches a KeyError, about 0.6 µs of the host time of every call, more
    where a backward has just left the caches cold."""
    data = _ENVIRON_DATA
    if data is None or os.environ is not _ENVIRON:  # another Python, or os.environ replaced
        return os.environ.get(name)
    key = _encoded_names.get(name)
    if key is None:
        key = _encoded_names[name] = _ENVIRON.encodekey(name)
    value = data.get(key)
    return None if value is None else _ENVIRON.decodevalue(value)


_epoch = 0


def epoch() -> int:
    """How many times the cached decisions were dropped (:func:`forget_decisions`): whatever
    remembers a decision remembers its epoch too."""
    return _epoch


def forget_decisions() -> None:
    """Drop every cached decision (after the tuning tables changed)."""
    global _epoch
    _decide.cache_clear()
    _epoch += 1


_sm_counts: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; under a stand-in CUDA driver, the stand-in's; a small fixed
    number under the interpreter or on CPU. Looked up once a device.

    Four keeps the interpreter's tests splitting every channel across programs.
    """
    count = _sm_counts.get(device)
    if count is None:
        if interpreted():
            count = 4
        elif device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            count = torch.cuda.get_device_properties(index).multi_processor_count
        elif launches_cpu_tensors():
            count = stand_in_sm_count()
        else:
            count = 4
        _sm_counts[device] = count
    return count


@dataclass(frozen=True)
class Plan:
    """A dispatch decision: ``backend`` runs it, ``kernel`` names the Triton plan (or None).

    ``tuning`` says where the choice came from: a tuning table's file and entry with the
    measured time against torch's, or ``"heuristics (...)"``; empty where no table was asked
    (a backend forced to torch or the reference, the CPU fallback). ``tunables`` are the
    thresholds the kernels run with that differ from the defaults, encoded as in
    ``Tunables.encode`` (``"tile=8192,num_warps=4"``; empty: the defaults); ``kernel`` then also
    carries them as its ``token``.
    """

    backend: str
    kernel: str | None
    reason: str
    facts: Mapping[str, object] = field(default_factory=dict)
    copies_input: bool = False
    tuning: str = ""
    tunables: str = ""

    def __post_init__(self) -> None:
        # Plans are cached and shared between calls: their facts are read-only.
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))

    def __str__(self) -> str:
        head = f"tritonbn plan: backend={self.backend}"
        if self.kernel is not None:
            head += f", kernel={self.kernel}"
        lines = [head, f"  reason: {self.reason}"]
        lines += [f"  {key}: {value}" for key, value in self.facts.items()]
        if self.tuning:
            lines.append(f"  tuning: {self.tuning}")
        if self.tunables:
            lines.append(f"  tunables: {self.tunables}")
        if self.copies_input:
            lines.append(
                "  note: the input is copied once first, into the memory format of torch's output "
                "(contiguous or channels_last), since the kernels write with their input's strides"
            )
        return "\n".join(lines)


def _facts(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], layout: Layout, training: bool
) -> dict[str, object]:
    return {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "layout": layout.name,
        "shape": shape,
        "N": layout.n,
        "C": layout.c,
        "spatial": layout.s,
        "per_channel": layout.rows,
        "training": training,
    }


def _kernel_plan(
    layout: Layout, training: bool, forced: str | None, device: torch.device, tuned: str = ""
) -> tuple[KernelPlan, str, str]:
    """(plan, reason, encoded tunables) for the Triton backend: the tuning table's choice
    ``tuned`` (a plan token that ``tuning.choice`` checked can run this input), else the forced
    plan, or the first plan of ``KERNEL_PLANS`` that can run ``layout`` and prefers it, with the
    default tunables ("")."""
    if tuned:
        name, _, tunables = tuned.partition("@")
        return KERNEL_PLANS[name], "a tuning table measured this plan fastest here (see tuning)", tunables
    plan, reason = _heuristic_plan(layout, training, forced, device)
    return plan, reason, ""


def _heuristic_plan(
    layout: Layout, training: bool, forced: str | None, device: torch.device
) -> tuple[KernelPlan, str]:
    if forced is not None:
        plan = KERNEL_PLANS[forced]
        if not training and forced != "eval":
            return KERNEL_PLANS["eval"], (
                f"plan {forced!r} was forced, but eval mode always runs the 'eval' plan"
            )
        refusal = plan.refusal(layout, training)
        if refusal is not None:
            raise ValueError(f"plan {forced!r} {refusal}")
        return plan, f"plan {forced!r} forced"
    plan = next(
        p
        for p in KERNEL_PLANS.values()
        if p.refusal(layout, training) is None and p.preferred(layout, training)
    )
    if plan.name == "eval":
        return plan, "eval mode: one elementwise pass with per-channel scale and shift"
    if plan.name == "fused-small":
        return plan, (
            f"the per-channel slab ({layout.rows} elements, a {fused_tile_elements(layout)}-element "
            "tile) fits one program: statistics, normalization and running statistics in one launch"
        )
    sms = sm_count(device)
    fill = (
        f"{sms} SMs (as many programs an SM as each kernel's registers let run at once)"
        if device.type == "cuda" and not interpreted()
        else f"{sms} stand-in SMs off the GPU"
    )
    if plan.name == "column-tiled":
        return plan, (
            f"{layout.name} rows of C={layout.c} contiguous channels: tiles coalesced along C, "
            f"rows split across programs to fill {fill}"
        )
    return plan, (
        f"{layout.rows} elements per channel and C={layout.c}: each channel is split across "
        f"programs (Welford partials merged with Chan's formula) to fill {fill}"
    )


_OFF_GPU = Plan(
    "torch", None, "not a CUDA tensor: PyTorch's own batch_norm is the fastest correct path there"
)
# The plans of a forced torch or reference backend under torch.compile, built ahead: dynamo
# cannot build a Plan (its facts are a MappingProxyType).
_TRACED_REQUESTS = {
    (name, source): Plan(name, None, f"backend {name!r} requested by {source}")
    for name in ("torch", "reference")
    for source in ("tritonbn.backend()", "TRITONBN_BACKEND")
}
_JIT_TRACED = Plan(
    "torch",
    None,
    "under torch.jit.trace: the traced graph records PyTorch's own batch_norm, "
    "which TorchScript and ONNX consumers can run",
)
_ONNX_EXPORTED = Plan(
    "torch",
    None,
    "under torch.onnx.export: the exported graph records PyTorch's own batch_norm, which ONNX "
    "has an operator for (it has none for tritonbn's kernels)",
)
_FORWARD_AD = Plan(
    "torch",
    None,
    "inside torch.autograd.forward_ad.dual_level(): PyTorch's own batch_norm, which has the "
    "forward-mode derivative the kernels' autograd Functions lack",
)
_FUNCTORCH = Plan(
    "torch",
    None,
    "inside a torch.func transform (vmap, grad, ...): PyTorch's own batch_norm, "
    "which those transforms support as they document",
)


def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing (its default dynamo exporter traces with
    torch.export). Asked only while exporting, so a compiled graph never loads ``torch.onnx``.
    The exporter traces without dynamo first; should that fail, its strict fallback runs under
    dynamo, which folds ``is_in_onnx_export()`` to False: that export keeps the custom ops."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def select_plan(x: torch.Tensor, training: bool, *, for_explain: bool = False) -> Plan:
    """The plan that runs ``batch_norm`` on ``x``, decided from shapes alone, never values.

    Raises RuntimeError when the requested backend cannot run here, unless ``for_explain``: then
    the plan says so in its facts. Decisions are cached by shape, strides, dtype, device and
    request, so a training loop pays for each layer's decision once.
    """
    if (
        not x.is_cuda
        and not for_explain
        and _current_override() is None
        and _environment("TRITONBN_BACKEND") is None
    ):
        # The hot path of every CPU training step, run where a backward has just left the caches
        # cold: ``is_cuda`` builds no torch.device, and no layout facts are needed to run torch.
        return _OFF_GPU
    device_type = x.device.type
    requested, forced, source = requested_backend(device_type)
    if requested == "auto" and device_type != "cuda" and not for_explain:
        return _OFF_GPU
    kernels_run_here = TRITON_MISSING is None and (
        device_type == "cuda" or (requested == "triton" and launches_cpu_tensors())
    )
    shape, strides = x.shape, x.stride()
    if torch.compiler.is_compiling():
        if requested != "reference" and onnx_exporting():
            return _ONNX_EXPORTED
        if requested in ("torch", "reference"):
            # No layout facts needed, and none computed: with dynamic=True they are symbolic.
            return _TRACED_REQUESTS[requested, source]
        if forced is None and kernels_run_here:
            return _traced_plan(x)
        # A forced plan (or a backend that cannot run here) is decided as the graph is traced:
        # the uncached function traces cleanly, while dynamo warns on every lru_cache it meets.
        decide = _decide.__wrapped__
    else:
        if is_functorch_wrapped_tensor(x):
            return _FUNCTORCH
        if requested != "reference" and forward_ad_active():
            return _FORWARD_AD
        if torch._C._get_tracing_state() is not None and requested != "reference":
            return _JIT_TRACED
        decide = _decide
    return decide(
        x.device,
        x.dtype,
        shape,
        strides,
        bool(training),
        requested,
        forced,
        source,
        for_explain,
        kernels_run_here,
    )


# The kernel plan of a call traced by torch.compile: the kernels' custom ops choose it when they
# run, from the sizes they get (see runtime_plan), so that one graph serves every batch size
# (dynamic=True: the sizes are symbolic as the graph is traced, and decide nothing).
RUNTIME_PLAN = ""
_TRACED = {
    copies: Plan(
        "triton",
        RUNTIME_PLAN,
        "traced by torch.compile: the kernel plan is chosen as each call "
        "runs, from its sizes (explain() on a real tensor shows it)",
        copies_input=copies,
    )
    for copies in (False, True)
}
_TRACED_FLOAT64 = Plan("torch", None, "float64: the kernels accumulate in float32")
_TRACED_EMPTY = Plan("torch", None, "empty batch: nothing to compute")


def _traced_plan(x: torch.Tensor) -> Plan:
    """The plan of a call torch.compile traces: the Triton backend with its kernel plan left to
    run time, on ``x`` as it is when its layout is one the kernels read (contiguous or
    channels_last), else on a contiguous copy. Each test below is a guard of the graph, never a
    graph break, with symbolic sizes too."""
    if x.dtype == torch.float64:
        return _TRACED_FLOAT64
    if x.numel() == 0:
        return _TRACED_EMPTY
    dense = (
        x.is_contiguous()
        or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    )
    return _TRACED[not dense]


def runtime_plan(x: torch.Tensor, training: bool) -> str:
    """The kernel plan (its token) for a call whose plan was left to run time (``RUNTIME_PLAN``):
    the Triton backend's decision for ``x``'s sizes, cached like every other."""
    kernel = _decide(
        x.device, x.dtype, x.shape, x.stride(), bool(training), "triton", None, "torch.compile", False, True
    ).kernel
    return kernel.token if isinstance(kernel, PlanName) else kernel


@functools.lru_cache(maxsize=4096)
def _decide(
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    training: bool,
    requested: str,
    forced: str | None,
    source: str,
    for_explain: bool,
    kernels_run_here: bool,
) -> Plan:
    shape, strides = tuple(shape), tuple(strides)
    layout = describe_strides(shape, strides)
    facts = _facts(device, dtype, shape, layout, training)
    empty = math.prod(shape) == 0
    if requested in ("torch", "reference"):
        return Plan(requested, None, f"backend {requested!r} requested by {source}", facts)
    if requested == "auto":
        if TRITON_MISSING is not None:
            return Plan("torch", None, f"{TRITON_MISSING}: PyTorch's own batch_norm runs", facts)
        if device.type != "cuda":
            return Plan(
                "torch",
                None,
                f"{device.type} tensor: PyTorch's own batch_norm is the fastest correct path there",
                facts,
            )
        if dtype == torch.float64:
            return Plan("torch", None, "float64: the kernels accumulate in float32", facts)
        if empty:
            return Plan("torch", None, "empty batch: nothing to compute", facts)
    else:  # "triton"
        if TRITON_MISSING is not None:
            problem = f"backend 'triton' needs the Triton kernels, but {TRITON_MISSING}"
            if not for_explain:
                raise RuntimeError(problem)
            facts["runnable here"] = f"no ({problem})"
        elif not kernels_run_here:
            problem = (
                f"backend 'triton' got a {device.type} tensor: the Triton kernels need a CUDA "
                "device, or TRITON_INTERPRET=1 set before triton is imported to run them through "
                "Triton's interpreter"
            )
            if not for_explain:
                raise RuntimeError(problem)
            facts["runnable here"] = f"no ({problem})"
        if empty:
            return Plan("torch", None, "empty batch: nothing to compute, torch's semantics", facts)
        if dtype == torch.float64:
            return Plan("torch", None, "float64 is not a kernel dtype: torch runs it", facts)
    # The kernels write the output (and the input's gradient) with the input's strides; torch
    # writes them in the input's suggested memory format. Where the two differ (a transposed
    # (N, C, L), a permuted 4-D tensor) or the kernels cannot read the input (not dense), they
    # run on a copy in torch's format, so the result has torch's strides.
    target = format_strides(shape, output_format(shape, strides))
    copies = not same_strides(shape, strides, target)
    if copies:
        layout = describe_strides(shape, target)
    # A tuning table's label for this case: "" (heuristics), "torch" or a plan token. Looked up
    # inside this cached function, so a table costs nothing after a shape's first call; under
    # torch.compile it is a constant of the graph, like the rest of this decision.
    label, tuning = _tuning.choice(
        device,
        dtype,
        shape,
        target if copies else strides,
        training,
        forced if training else None,
        requested == "auto",
    )
    if label == "torch":
        return Plan(
            "torch",
            None,
            "a tuning table measured PyTorch's own batch_norm fastest here (see tuning)",
            facts,
            tuning=tuning,
        )
    kernel, reason, tunables = _kernel_plan(layout, training, forced, device, label)
    facts["launches"] = (
        f"{kernel.forward_launches} forward, {kernel.backward_launches} backward"
        if training
        else f"{kernel.forward_launches} forward"
    )
    token = f"{kernel.name}@{tunables}" if tunables else kernel.name
    if token == kernel.name:
        name: str = kernel.name
    elif torch.compiler.is_compiling():
        # dynamo cannot build a str subclass: the traced graph carries the plain token, which is
        # what the kernels read anyway.
        name = token
    else:
        name = PlanName(kernel.name, token)
    return Plan("triton", name, reason, facts, copies_input=copies, tuning=tuning, tunables=tunables)


def explain(input: torch.Tensor, training: bool = True, **options: object) -> Plan:
    """The dispatcher's decision for ``tritonbn.batch_norm(input, training=training, ...)``:
    which backend and kernel plan would run it, and why. Decided from shapes, strides, dtype,
    device and the GPU, never values; nothing runs.

    Args:
        input (Tensor): the input of the call, ``(N, C, *)``; only its metadata is read, so
            ``torch.empty(..., device="meta")`` will do.
        training (bool): explain a training call (default) or an eval call.
        backend (str, optional): explain this backend instead of the current one, also one that
            cannot run here (a CPU tensor on ``"triton"`` without a GPU: the report says so).
        plan (str, optional): explain this forced kernel plan (implies ``backend="triton"``).

    Returns:
        Plan: prints as a short report — backend, kernel plan, reason, launches, where the
        choice came from (tuning table or heuristics) and the facts used.

    Raises:
        TypeError, ValueError, NotImplementedError: an ``input`` that ``batch_norm`` rejects
            (not a tensor, fewer than 2 dimensions, a dtype other than float16, bfloat16,
            float32 or float64, one value per channel in training) raises what ``batch_norm``
            would: no plan is named for a call that cannot run.

    Examples::

        >>> print(tritonbn.explain(torch.empty(256, 6, 24, 24), backend="triton"))
        tritonbn plan: backend=triton, kernel=split-welford
          reason: ...
    """
    # batch_norm's own input checks, so explain and batch_norm cannot disagree.
    from ._checks import check_input, check_training_input

    unknown = set(options) - {"backend", "plan"}
    if unknown:
        raise TypeError(f"explain() got unexpected options {sorted(unknown)}; known: backend, plan")
    check_input(input, "explain")
    check_training_input(input, bool(training))
    if "backend" in options or "plan" in options:
        name = str(options.get("backend", "triton" if options.get("plan") else "auto"))
        plan = options.get("plan")
        with backend(name, plan=None if plan is None else str(plan)):
            return select_plan(input, training, for_explain=True)
    return select_plan(input, training, for_explain=True)
