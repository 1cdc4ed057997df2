"""``tritonbn-tune``: measure the kernel plans and their tunables on this GPU and write a tuning table.

The sweep (``python -m tritonbn.tune --help`` prints this):

* **cases** — the shapes of ``SHAPES`` (LeNet's four layers, ResNet-like layers, small-C and 2-D
  inputs) × float32, bfloat16, float16 × NCHW and channels_last (4-D shapes only) × training
  (forward and backward, timed together) and eval (forward);
* **candidates** of a case — PyTorch's own ``F.batch_norm`` ("torch"; the table may say "use
  torch here"), then every kernel plan that can run the case with the default tunables, then one
  tunable at a time changed around the defaults (``PLAN_GRID``). Candidates whose launches would
  be identical to an earlier candidate's (same plan, same block sizes, splits and warps) are
  dropped before anything runs, and on the GPU those whose launches turn out identical once the
  splits are fitted to the programs an SM holds (``kernels/occupancy.py``: eight programs an SM
  where only three fit run as three) are dropped before they are timed;
* **check, then time** — each candidate runs once and its output (and in training its input,
  weight and bias gradients and running statistics) is compared with ``tritonbn.reference`` in
  float64 at the dtype's tolerance; a candidate that fails, raises, or whose compiled kernels
  spill registers (read from the cubin with ``cuobjdump``) is dropped and reported. The others
  are timed with device events (``triton.testing.do_bench``, median);
* **budget** — ``--budget-s`` bounds the sweep's wall time (default 90 s). The sweep runs in this
  order and stops where the budget ends, so a short budget reduces the grid from its end: dtype
  by dtype (float32, then bfloat16, then float16), and within a dtype tier by tier (tier 0:
  torch and the heuristics' own plan; tier 1: the other plans with default tunables; tier 2: the
  one-factor tunable variants), and within a tier training before eval, shapes in ``SHAPES``
  order, NCHW before channels_last. A case gets a table entry when torch and at least one kernel
  candidate were measured. The first run also compiles every kernel variant it times (Triton
  caches them on disk), so a second run measures more within the same budget.

The table (JSON, ``tritonbn.tuning`` documents the schema) goes to ``--out``, by default
``<user tuning folder>/<device name>.json`` (``$XDG_CACHE_HOME/tritonbn/tuning/`` or
``~/.cache/tritonbn/tuning/``), where the dispatcher finds it ahead of the tables shipped with
the package. ``bench/gpu_check.py`` runs this command; :func:`run_sweep` is the same sweep for code.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import reference
from tritonbn.kernels.layout import describe_strides
from tritonbn.kernels.plans import (
    DEFAULT_TUNABLES,
    ELEMENTWISE_PROGRAMS_PER_SM,
    KERNEL_PLANS,
    Tunables,
    geometry,
    parse_plan,
    plan_token,
)

__all__ = [
    "DTYPES",
    "PLAN_GRID",
    "SHAPES",
    "Candidate",
    "Case",
    "candidates",
    "cases",
    "main",
    "run_sweep",
    "screen",
    "table_document",
    "table_entry",
    "write_table",
]

SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 6, 24, 24),
    (256, 16, 8, 8),
    (256, 120),
    (256, 84),  # LeNet
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (32, 2048, 7, 7),  # ResNet-like
    (8192, 1024),
    (4096, 64, 1, 1),  # 2-D and small-C
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One tunable at a time around the defaults, per plan (values other than the default). The
# programs an SM are an aim: a kernel of which fewer fit runs that many (kernels/occupancy.py), so
# the sweep asks whether fewer, longer programs (2, 3) or more (8, where they fit) beat four.
PLAN_GRID: dict[str, dict[str, tuple[int, ...]]] = {
    "fused-small": {"fused_max_tile": (32768, 65536), "num_warps": (8, 32)},
    "split-welford": {
        "tile": (2048, 8192),
        "max_spatial_block": (256,),
        "reduction_programs_per_sm": (2, 3, 8),
        "elementwise_programs_per_sm": (4, 16),
        "num_warps": (4, 16),
    },
    "column-tiled": {
        "tile": (2048, 8192),
        "max_column_block": (32, 128),
        "reduction_programs_per_sm": (2, 3, 8),
        "elementwise_programs_per_sm": (4, 16),
        "num_warps": (4, 16),
    },
    "eval": {
        "tile": (2048, 8192),
        "max_spatial_block": (256,),
        "max_column_block": (128,),
        "elementwise_programs_per_sm": (4, 16),
        "num_warps": (4, 16),
    },
}
# Largest normalized error max|a - b| / max(1, max|reference|) a candidate may show.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class Case:
    """One measured input: shape, dtype, memory format and mode."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    training: bool

    @property
    def strides(self) -> tuple[int, ...]:
        x = torch.empty(self.shape, device="meta")
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        return tuple(x.stride())

    @property
    def layout(self) -> str:
        return describe_strides(self.shape, self.strides).name

    @property
    def mode(self) -> str:
        return "train" if self.training else "eval"

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        memory = "channels_last" if self.channels_last else "contiguous"
        return f"{self.mode} {dtype} {memory} {self.shape}"


@dataclass(frozen=True)
class Candidate:
    """``label`` is ``"torch"`` or a plan token (``plans.plan_token``); ``tier`` its place in the
    sweep's order (0: torch and the heuristic plan, 1: other plans, 2: tunable variants)."""

    label: str
    tier: int


def cases(shapes: Iterable[tuple[int, ...]] = SHAPES, dtypes: Iterable[torch.dtype] = DTYPES) -> list[Case]:
    """The sweep's cases in its order (see the module docstring); a channels_last case that is
    contiguous too (C×1×1 images, single-channel images, 2-D), the same input as its NCHW case,
    is left out."""
    result = []
    shapes, dtypes = tuple(shapes), tuple(dtypes)
    for dtype in dtypes:
        for training in (True, False):
            for shape in shapes:
                for channels_last in (False, True):
                    case = Case(tuple(shape), dtype, channels_last, training)
                    if channels_last and (len(shape) != 4 or _also_contiguous(case)):
                        continue
                    result.append(case)
    return result


def _also_contiguous(case: Case) -> bool:
    """Whether ``case``'s strides describe a contiguous tensor (torch ignores the strides of
    size-1 dimensions: (N, C, 1, 1) channels_last is contiguous)."""
    return torch.empty_strided(case.shape, case.strides, device="meta").is_contiguous()


def _geometries(case: Case, label: str, sm_count: int) -> tuple[object, ...]:
    """What the launches of ``label`` on ``case`` depend on: equal for equal launches."""
    plan, tunables = parse_plan(label)
    layout = describe_strides(case.shape, case.strides)
    channel_major = plan.channel_major(layout)
    if plan.single_tile:
        return (
            plan.name,
            geometry(
                layout, channel_major=channel_major, sm_count=sm_count, single_tile=True, tunables=tunables
            ),
        )
    elementwise = geometry(
        layout,
        channel_major=channel_major,
        sm_count=sm_count,
        programs_per_sm=tunables.elementwise_programs_per_sm,
        tunables=tunables,
    )
    if not case.training:  # the eval forward is the elementwise launch alone
        return (plan.name, elementwise)
    reduction = geometry(layout, channel_major=channel_major, sm_count=sm_count, tunables=tunables)
    return (plan.name, reduction, elementwise)


def candidates(case: Case, sm_count: int) -> list[Candidate]:
    """The candidates of ``case`` in sweep order, without duplicate launches.

    Args:
        case: the input.
        sm_count: the GPU's multiprocessors (the splits depend on it).

    Returns:
        torch first, then the kernel candidates, each with its tier.
    """
    from tritonbn.dispatch import _heuristic_plan

    layout = describe_strides(case.shape, case.strides)
    heuristic, _ = _heuristic_plan(layout, case.training, None, torch.device("cpu"))
    result = [Candidate("torch", 0)]
    seen: set[tuple[object, ...]] = set()

    def add(name: str, tunables: Tunables, tier: int) -> None:
        plan = KERNEL_PLANS[name]
        if plan.refusal(layout, case.training, tunables) is not None:
            return
        label = plan_token(name, tunables)
        key = _geometries(case, label, sm_count)
        if key not in seen:
            seen.add(key)
            result.append(Candidate(label, tier))

    add(heuristic.name, DEFAULT_TUNABLES, 0)
    for name in KERNEL_PLANS:
        add(name, DEFAULT_TUNABLES, 1)
    for name, grid in PLAN_GRID.items():
        for field_name, values in grid.items():
            for value in values:
                add(name, replace(DEFAULT_TUNABLES, **{field_name: value}), 2)
    return result


# ---------------------------------------------------------------------------------------------
# Running, checking and screening one candidate


@dataclass
class _Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    dy: torch.Tensor


def _inputs(case: Case, device: torch.device, seed: int = 0) -> _Inputs:
    generator = torch.Generator().manual_seed(seed)
    c = case.shape[1]
    x = (torch.randn(case.shape, generator=generator) * 2 + 0.5).to(case.dtype)
    dy = torch.randn(case.shape, generator=generator).to(case.dtype)
    if case.channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    weight = torch.rand(c, generator=generator) + 0.5
    bias = torch.randn(c, generator=generator)
    running_mean = torch.randn(c, generator=generator) * 0.1
    running_var = torch.rand(c, generator=generator) + 0.5
    return _Inputs(*(t.to(device) for t in (x, weight, bias, running_mean, running_var, dy)))


def _runner(case: Case, label: str, inputs: _Inputs) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A function running ``label`` on ``inputs`` once: training returns (y, dx, dγ, dβ), eval (y,).
    Running statistics are updated in place, as a training step does."""
    from tritonbn.autograd import triton_batch_norm

    x, weight, bias = inputs.x, inputs.weight, inputs.bias
    mean, var = inputs.running_mean, inputs.running_var

    def forward(xg: torch.Tensor, wg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        if label == "torch":
            return F.batch_norm(xg, mean, var, wg, bg, case.training, MOMENTUM, EPS)
        return triton_batch_norm(xg, wg, bg, mean, var, case.training, MOMENTUM, EPS, label)

    if not case.training:
        return lambda: (forward(x, weight, bias),)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def step() -> tuple[torch.Tensor, ...]:
        y = forward(*leaves)
        return (y, *torch.autograd.grad(y, leaves, inputs.dy))

    return step


def _check(case: Case, label: str, device: torch.device) -> str | None:
    """None when ``label`` matches the float64 reference on ``case``, else what differs."""
    inputs = _inputs(case, device)
    expected_inputs = _inputs(case, device)
    try:
        got = _runner(case, label, inputs)()
    except Exception as error:  # any failure drops the candidate; the report says which
        return f"raised {type(error).__name__}: {str(error)[:200]}"
    x64 = expected_inputs.x.double()
    leaves = [
        t.detach().requires_grad_()
        for t in (x64, expected_inputs.weight.double(), expected_inputs.bias.double())
    ]
    mean64, var64 = expected_inputs.running_mean.double(), expected_inputs.running_var.double()
    y64 = reference.batch_norm(leaves[0], mean64, var64, leaves[1], leaves[2], case.training, MOMENTUM, EPS)
    expected: list[tuple[str, torch.Tensor, torch.Tensor]] = [("y", got[0], y64)]
    if case.training:
        grads = torch.autograd.grad(y64, leaves, expected_inputs.dy.double())
        expected += [
            (name, g, e) for name, g, e in zip(("dx", "dweight", "dbias"), got[1:], grads, strict=True)
        ]
        expected += [
            ("running_mean", inputs.running_mean, mean64),
            ("running_var", inputs.running_var, var64),
        ]
    tolerance = TOLERANCE[case.dtype]
    for name, value, want in expected:
        value = value.double()
        if value.shape != want.shape:
            return f"{name}: shape {tuple(value.shape)}, expected {tuple(want.shape)}"
        if not torch.isfinite(value).all():
            return f"{name}: not finite"
        error = ((value - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
        if error > tolerance:
            return f"{name}: normalized error {error:.3g} > {tolerance:g}"
    return None


_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@functools.cache
def _cuobjdump() -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def kernel_resources(compiled: Any) -> dict[str, int]:
    """Registers, spill bytes (stack and local memory) and shared memory of a compiled kernel,
    read from its cubin with Triton's ``cuobjdump``; without it, from the loaded kernel's
    ``n_regs``/``n_spills`` (a real driver's numbers)."""
    key = getattr(compiled, "hash", None)
    if key is not None and key in _resources:
        return _resources[key]
    usage = _read_resources(compiled)
    if key is not None:
        _resources[key] = usage
    return usage


_resources: dict[str, dict[str, int]] = {}


def _read_resources(compiled: Any) -> dict[str, int]:
    shared = int(getattr(compiled.metadata, "shared", 0))
    tool = _cuobjdump()
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    if tool is not None and cubin:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "kernel.cubin"
            path.write_bytes(cubin)
            out = subprocess.run(
                [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=False
            ).stdout
        found = _RESOURCES.search(out)
        if found:
            reg, stack, static_shared, local = map(int, found.groups())
            return {"registers": reg, "spill_bytes": stack + local, "shared": max(shared, static_shared)}
    return {
        "registers": int(getattr(compiled, "n_regs", 0) or 0),
        "spill_bytes": int(getattr(compiled, "n_spills", 0) or 0),
        "shared": shared,
    }


def _jit_kernels() -> tuple[Any, ...]:
    from tritonbn.kernels import backward, fused_small, normalize, stats

    return (
        stats.stats_kernel,
        normalize.normalize_kernel,
        backward.backward_sums_kernel,
        backward.backward_dx_kernel,
        fused_small.fused_forward_kernel,
        fused_small.fused_backward_kernel,
    )


def launched_kernels(run: Callable[[], object]) -> list[Any]:
    """The compiled kernels ``run()`` launches, each once (empty under the interpreter)."""
    return _distinct(launches(run))


def _distinct(launched: Sequence[tuple[Any, tuple[int, ...]]]) -> list[Any]:
    """The compiled kernels of ``launches``' (kernel, grid) pairs, each once, in launch order."""
    return list({id(kernel): kernel for kernel, _ in launched}.values())


def launches(run: Callable[[], object]) -> list[tuple[Any, tuple[int, ...]]]:
    """(compiled kernel, grid) of every launch ``run()`` makes, in order (empty under the
    interpreter): each kernel's JIT ``run`` is wrapped for the call to note what it launches, and
    a no-op launch hook makes every launch take the JIT path (``kernels.launch`` skips its
    records, and the C++ glue its replays, while a hook is in)."""
    from triton import knobs

    noted: list[tuple[Any, tuple[int, ...]]] = []
    kernels = _jit_kernels()

    def noting(original: Callable[..., Any]) -> Callable[..., Any]:
        def run_and_note(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if result is not None and hasattr(result, "asm") and not kwargs.get("warmup"):
                noted.append((result, tuple(kwargs["grid"])))
            return result

        return run_and_note

    def hook(metadata: Any) -> None:
        return None

    for kernel in kernels:
        kernel.run = noting(kernel.run)  # an instance attribute over the method
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        run()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
        for kernel in kernels:
            del kernel.run
    return noted


@dataclass
class Screening:
    """What ``screen`` found for one candidate: its kernels' resources, why it is dropped, and
    its launches (each compiled kernel's hash with its grid, in order)."""

    label: str
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: str | None = None
    launches: tuple[tuple[str, tuple[int, ...]], ...] = ()


def _shared_limit(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 232448)
    return 232448  # sm_90: 227 KiB a block


def screen(case: Case, labels: Sequence[str], device: torch.device) -> list[Screening]:
    """Launch each kernel candidate of ``case`` once on ``device`` and read its compiled kernels'
    resources; a candidate whose kernels spill registers or exceed the shared memory of a block is
    dropped (``Screening.dropped`` says why) before any time is measured.

    Works on a GPU and under ``bench/standin_cuda.py`` (kernels compile for sm_90 for real and
    launch nowhere); under the interpreter nothing compiles and nothing is dropped.
    """
    limit = _shared_limit(device)
    found = []
    for label in labels:
        result = Screening(label)
        if label != "torch":
            inputs = _inputs(case, device)
            try:
                launched = launches(_runner(case, label, inputs))
            except Exception as error:  # a compiler or resource error drops the candidate
                result.dropped = f"does not compile or launch: {type(error).__name__}: {str(error)[:200]}"
                launched = []
            result.launches = tuple((str(kernel.hash), grid) for kernel, grid in launched)
            for kernel in _distinct(launched):
                name = f"{kernel.name}[w{kernel.metadata.num_warps}]"
                usage = kernel_resources(kernel)
                result.kernels[name] = usage
                if result.dropped is None and usage["spill_bytes"] > 0:
                    result.dropped = f"{name} spills {usage['spill_bytes']} bytes a thread"
                elif result.dropped is None and usage["shared"] > limit:
                    result.dropped = f"{name} needs {usage['shared']} bytes of shared memory > {limit}"
        found.append(result)
    return found


# ---------------------------------------------------------------------------------------------
# The sweep


Timer = Callable[[Callable[[], object], Case, str], float]


def _do_bench(fn: Callable[[], object], case: Case, label: str) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


class _Progress:
    """tqdm when installed (the ``train`` extra), else a plain line every case."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="tritonbn-tune", unit="candidate")

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[-60:], refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"tritonbn-tune: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_out(device_name: str) -> Path:
    """``<user tuning folder>/<device name as a file name>.json``."""
    from tritonbn.tuning import user_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device_name).strip("-") or "device"
    return user_dir() / f"{slug}.json"


def write_table(path: Path, table: dict[str, Any]) -> None:
    """Write ``table`` as JSON to ``path`` atomically (a reader never sees half a table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(table, tmp, indent=1, sort_keys=False)
        tmp.write("\n")
    os.replace(tmp.name, path)


def table_entry(case: Case, measured: Mapping[str, float], choice: str | None = None) -> dict[str, Any]:
    """The table entry (``tritonbn.tuning`` schema 1) of ``case`` from its candidates' times in ms,
    torch's among them: ``choice`` where given (one of them), else the fastest (ties: label order)."""
    best = choice if choice is not None else min(sorted(measured), key=measured.__getitem__)
    return {
        "layout": case.layout,
        "dtype": str(case.dtype).replace("torch.", ""),
        "mode": case.mode,
        "shape": list(case.shape),
        "per_channel": math.prod(case.shape) // case.shape[1],
        "channels": case.shape[1],
        "choice": best,
        "timings_ms": dict(sorted(measured.items())),
        "torch_ms": measured["torch"],
        "ratio_to_torch": measured[best] / measured["torch"],
    }


def table_document(
    identity: tuple[str, tuple[int, int]],
    sms: int,
    entries: list[dict[str, Any]],
    versions: dict[str, Any] | None = None,
    **about: Any,
) -> dict[str, Any]:
    """A table around ``entries``: schema, the GPU (``identity`` is (name, capability)), the
    ``versions`` that measured it (default: this process's torch, Triton and tritonbn), the date,
    then ``about`` (how it was measured), then the entries."""
    if versions is None:
        import triton

        versions = {"torch": torch.__version__, "triton": triton.__version__}
        versions["tritonbn"] = tritonbn.__version__
    return {
        "schema": 1,
        "device": {"name": identity[0], "capability": list(identity[1]), "sm_count": sms},
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **about,
        "entries": entries,
    }


def run_sweep(
    budget_s: float,
    out: Path | None = None,
    progress: bool = True,
    *,
    timer: Timer | None = None,
    sweep_cases: Sequence[Case] | None = None,
    device: torch.device | None = None,
    identity: tuple[str, tuple[int, int]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    screen_candidates: bool | None = None,
) -> dict[str, Any]:
    """Measure the candidates of every case on the current CUDA GPU and write a tuning table.

    Args:
        budget_s: wall-time budget in seconds; the sweep stops where it ends (the order in the
            module docstring says what a short budget leaves out).
        out: where to write the table; None: ``<user tuning folder>/<device name>.json``.
        progress: show a tqdm bar (plain lines without tqdm).
        timer: test mode: ``timer(fn, case, label)`` returns milliseconds instead of timing
            ``fn`` with device events; with it the sweep also runs without CUDA (``device``
            defaults to the CPU, where the kernels need ``TRITON_INTERPRET=1``).
        sweep_cases: the cases (default :func:`cases` ()).
        device: the device (default the current CUDA device).
        identity: (device name, (major, minor)) written in the table (default the device's).
        clock: the budget's clock.
        screen_candidates: launch each kernel candidate once before checking and timing it, to
            drop those whose kernels spill or that launch what a timed one launched (``screen``);
            default: on CUDA.

    Returns:
        The table written (``tritonbn.tuning`` schema 1) with ``"out"`` (the path) added; its
        ``"failures"`` and ``"dropped"`` list the candidates removed and why, ``"skipped"``
        counts those the budget left out.

    Raises:
        RuntimeError: no CUDA GPU and no injected ``timer``.
    """
    from tritonbn.dispatch import sm_count

    if timer is None and not torch.cuda.is_available():
        raise RuntimeError("tritonbn-tune needs a CUDA GPU: it times the kernels with device events")
    start = clock()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if timer is None else torch.device("cpu")
    if identity is None:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            identity = (props.name, (props.major, props.minor))
        else:
            identity = (f"{device.type} (test)", (0, 0))
    sms = sm_count(device)
    timer = timer or _do_bench
    all_cases = list(cases() if sweep_cases is None else sweep_cases)
    per_case = {case: candidates(case, sms) for case in all_cases}
    # Sweep order: dtype by dtype; within one, tier by tier; within a tier, case order.
    dtype_order = list(dict.fromkeys(case.dtype for case in all_cases))
    order = [
        (case, candidate)
        for dtype in dtype_order
        for tier in (0, 1, 2)
        for case in all_cases
        if case.dtype == dtype
        for candidate in per_case[case]
        if candidate.tier == tier
    ]
    bar = _Progress(len(order), progress)
    timings: dict[Case, dict[str, float]] = {case: {} for case in all_cases}
    failures: list[dict[str, str]] = []
    dropped: list[dict[str, str]] = []
    skipped = 0
    if screen_candidates is None:
        screen_candidates = device.type == "cuda"
    # Per case, the launches of each timed candidate: a later one that launches the same kernels
    # on the same grids would only time the same thing twice.
    timed_launches: dict[Case, dict[tuple[tuple[str, tuple[int, ...]], ...], str]] = {
        case: {} for case in all_cases
    }
    try:
        for case, candidate in order:
            if clock() - start >= budget_s:
                skipped += 1
                continue
            label = candidate.label
            launched: tuple[tuple[str, tuple[int, ...]], ...] = ()
            if screen_candidates and label != "torch":
                screening = screen(case, [label], device)[0]
                reason, launched = screening.dropped, screening.launches
                twin = timed_launches[case].get(launched) if launched else None
                if reason is None and twin is not None:
                    reason = f"launches what {twin} launches (the same kernels on the same grids)"
                if reason is not None:
                    dropped.append({"case": str(case), "candidate": label, "reason": reason})
                    bar.step(f"{case} {label}: dropped")
                    continue
            problem = _check(case, label, device)
            if problem is not None:
                failures.append({"case": str(case), "candidate": label, "reason": problem})
                bar.step(f"{case} {label}: failed")
                continue
            run = _runner(case, label, _inputs(case, device))
            timings[case][label] = float(timer(run, case, label))
            if launched:
                timed_launches[case][launched] = label
            bar.step(f"{case} {label}")
    finally:
        bar.close()
    entries = [
        table_entry(case, timings[case])
        for case in all_cases
        if "torch" in timings[case] and len(timings[case]) >= 2
    ]
    table = table_document(
        identity,
        sms,
        entries,
        budget_s=budget_s,
        elapsed_s=round(clock() - start, 3),
        timer="triton.testing.do_bench median (ms)" if timer is _do_bench else "injected",
        tolerance={str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()},
    )
    table.update(failures=failures, dropped=dropped, skipped=skipped)
    path = Path(out) if out is not None else default_out(identity[0])
    write_table(path, table)
    return dict(table, out=str(path))


def _describe_grid() -> str:
    lines = [
        "grid:",
        "  shapes: " + ", ".join(str(s) for s in SHAPES),
        "  dtypes: float32, bfloat16, float16; NCHW and channels_last; train and eval",
        "  candidates: torch, every plan that can run the case, then one tunable at a time:",
    ]
    for name, grid in PLAN_GRID.items():
        lines.append(f"    {name}: " + "; ".join(f"{k} in {v}" for k, v in grid.items()))
    lines.append(
        f"  defaults: {DEFAULT_TUNABLES} (num_warps None: by tile size; elementwise "
        f"programs per SM {ELEMENTWISE_PROGRAMS_PER_SM})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tritonbn-tune`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="tritonbn-tune",
        description=__doc__.split("\n\n", 1)[1],
        epilog=_describe_grid(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=90.0,
        help="wall-time budget in seconds (default 90: the sweep's order says "
        "what a short budget leaves out)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="table file (default: <user tuning folder>/<device name>.json)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    parser.add_argument(
        "--list", action="store_true", help="print the cases and candidates (no GPU needed) and exit"
    )
    args = parser.parse_args(argv)
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.list:
        from tritonbn.dispatch import sm_count

        sms = sm_count(torch.device("cuda")) if torch.cuda.is_available() else 132
        total = 0
        for case in cases():
            labels = [c.label for c in candidates(case, sms)]
            total += len(labels)
            print(f"{case}: {', '.join(labels)}")
        print(f"{total} candidates ({sms} SMs)")
        return 0
    if not torch.cuda.is_available():
        print(
            "tritonbn-tune: needs a CUDA GPU (it times the kernels with device events); "
            "none is available here",
            file=sys.stderr,
        )
        return 2
    result = run_sweep(args.budget_s, args.out, progress=not args.no_progress)
    print(
        f"wrote {result['out']}: {len(result['entries'])} entries, {len(result['failures'])} "
        f"failed, {len(result['dropped'])} dropped, {result['skipped']} skipped by the budget"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
