"""Launch records: a Triton kernel launched through its compiled launcher, not the JIT's.

``kernel[grid](*args, **meta)`` binds the arguments, specializes them, hashes a cache key, looks
the compiled kernel up and re-checks every global ``tl.constexpr`` the kernel reads, on every call:
15–27 µs of host time, more than a LeNet layer's GPU time. A launch record does that work once per
*launch site* (which kernel, with which constexprs, on which shapes, dtypes and pointer
alignments): the first launch goes through the JIT, which compiles and returns the compiled
kernel; later launches with the same record key call that kernel's own launcher directly, as
inductor's generated launchers do — or, where the launcher's layout is recognized, the C function
behind it (:func:`_direct`).

The record key must determine everything the JIT specializes on. Callers build it from the
layout key (shape, strides, dtypes, plan, flags: the integer arguments all derive from it) and
``tensors_key`` of the tensors they pass, since Triton specializes pointers on 16-byte
alignment. Under the interpreter, with launch hooks installed (profilers), or on a Triton whose
compiled kernels lack the launcher API, every launch takes the JIT path.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver

from .runtime import interpreted

__all__ = ["Launcher", "launch_counts", "tensors_key"]

# Records kept per kernel before the oldest are dropped (a model has a few dozen launch sites).
MAX_RECORDS = 1024

# Whether records may call the C launch function of Triton's launcher directly (see _direct).
_DIRECT = True

_counts = {"jit": 0, "record": 0}
# While a ``replay.recording()`` block runs in a thread: the (launcher, key, args) of its launches.
_recording = threading.local()


def launch_counts() -> dict[str, int]:
    """Launches since the process started, by path: ``"jit"`` (Triton's JIT call, which compiles
    on a cache miss) and ``"record"`` (a launch record's direct call)."""
    return dict(_counts)


def tensors_key(*tensors: torch.Tensor | None) -> tuple[object, ...]:
    """What Triton specializes a kernel on in these tensor arguments: each one's dtype and
    whether its data pointer is 16-byte aligned (None for an absent tensor)."""
    return tuple([None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


def _hooks_installed() -> bool:
    runtime = knobs.runtime
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


class _Record:
    """A compiled kernel bound to one launch site: its launch call as a prefix before the stream,
    the rest before the kernel's arguments, whether those go as one tuple (see :func:`_direct`),
    and the constexpr tail of the arguments."""

    __slots__ = ("after", "before", "compiled", "constants", "grid", "launch", "nested")

    def __init__(self, compiled: Any, grid: tuple[int, int, int], constants: tuple[object, ...], count: int):
        self.launch, self.before, self.after, self.nested = _direct(compiled, grid, count)
        self.compiled = compiled
        self.grid = grid
        self.constants = constants


def _direct(compiled: Any, grid: tuple[int, int, int], count: int) -> tuple[Any, tuple, tuple, bool]:
    """How to launch ``compiled`` on ``grid`` with ``count`` arguments (constexprs included):
    ``(launch, before, after, nested)`` for ``launch(*before, stream, *after, *arguments)``, or
    ``launch(*before, stream, *after, arguments)`` when ``nested``.

    The compiled kernel's launcher (``compiled.run``, Triton's ``CudaLauncher``) is a Python
    object whose ``__call__`` allocates scratch memory the kernel may need and calls the C
    function ``launch`` with a longer argument list, laid out differently in each Triton version
    (3.6 passes the kernel's arguments flat, 3.8 as a tuple after its signature). For a kernel
    without scratch memory that call does nothing else, so its C function can be called
    directly, which saves 0.7–1 µs a launch (measured under the stand-in driver). The layout is
    learned, not assumed: a copy of the launcher whose ``launch`` only notes its arguments is
    called once with marker objects in place of the stream and the kernel's arguments, and the
    call it makes is kept with the markers' places. Where anything differs from those two
    shapes (scratch memory, an instrumented launcher, an unknown layout), launches go through
    ``compiled.run``.
    """
    run = compiled.run
    fallback = (run, grid, (compiled.function, compiled.packed_metadata, None, None, None), False)
    if not _DIRECT or any(getattr(run, name, 1) for name in ("global_scratch_size", "profile_scratch_size")):
        return fallback
    if getattr(run, "gsan_enabled", False) or not callable(getattr(run, "launch", None)):
        return fallback
    calls: list[tuple[object, ...]] = []
    probe = copy.copy(run)
    probe.launch = lambda *args: calls.append(args)
    stream, arguments = object(), tuple(object() for _ in range(count))
    try:
        probe(*grid, stream, *fallback[2], *arguments)
    except Exception:  # a launcher that looks at its arguments: not one of the known shapes
        return fallback
    if len(calls) != 1:
        return fallback
    (call,) = calls
    nested = bool(call) and isinstance(call[-1], tuple) and len(call[-1]) == count
    head, tail = (call[:-1], call[-1]) if nested else (call[: len(call) - count], call[len(call) - count :])
    if len(tail) != count or any(a is not b for a, b in zip(tail, arguments, strict=True)):
        return fallback
    markers = [i for i, value in enumerate(head) if value is stream]
    if len(markers) != 1 or any(value is marker for value in head for marker in arguments):
        return fallback
    (at,) = markers
    return run.launch, head[:at], head[at + 1 :], nested


# PTX parameter types by size in bytes.
_PTX_SIZES = {
    **dict.fromkeys(("u64", "s64", "b64", "f64"), 8),
    **dict.fromkeys(("u32", "s32", "b32", "f32"), 4),
    **dict.fromkeys(("u16", "s16", "b16", "f16"), 2),
    **dict.fromkeys(("u8", "s8", "b8"), 1),
}


def parameter_sizes(compiled: Any) -> list[int] | None:
    """The size in bytes of each parameter of ``compiled``'s kernel, in order, as its PTX
    declares them: what the driver reads from a launch's parameter array. None without PTX or
    with a parameter that is not a plain scalar or pointer (an aligned byte array)."""
    try:
        ptx = compiled.asm["ptx"]
    except (AttributeError, KeyError, TypeError):
        return None
    entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx if isinstance(ptx, str) else "")
    if entry is None:
        return None
    sizes = []
    for declaration in entry.group(1).split(","):
        if not declaration.strip():
            continue
        found = re.match(r"\s*\.param\s+\.(\w+)\s", declaration)
        size = _PTX_SIZES.get(found.group(1)) if found else None
        if size is None:
            return None
        sizes.append(size)
    return sizes


class Launcher:
    """Launches one ``@triton.jit`` kernel whose constexpr parameters all follow its runtime ones.

    ``launcher(key, grid, args, meta)``: ``args`` are the runtime arguments in order, ``meta`` the
    constexprs and launch options (``num_warps``), or a function returning them (called only when
    the JIT path runs); ``key`` identifies the launch site (see the module docstring). Same
    arguments, same result as ``kernel[grid](*args, **meta)``.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.records: dict[Hashable, _Record] = {}
        params = getattr(kernel, "params", None)
        self.constexpr_names = None
        if params is not None:
            flags = [p.is_constexpr for p in params]
            if flags != sorted(flags):
                raise TypeError(f"{kernel}: every constexpr parameter must follow the runtime ones")
            self.constexpr_names = tuple(p.name for p in params if p.is_constexpr)

    def __call__(
        self,
        key: Hashable,
        grid: Sequence[int],
        args: Sequence[object],
        meta: dict[str, object] | Callable[[], dict[str, object]],
    ) -> None:
        notes = getattr(_recording, "notes", None)
        if notes is not None:
            notes.append((self, key, tuple(args)))
        record = self.records.get(key)
        if record is not None and not _hooks_installed():
            device = driver.active.get_current_device()
            stream = driver.active.get_current_stream(device)
            if record.nested:
                record.launch(*record.before, stream, *record.after, (*args, *record.constants))
            else:
                record.launch(*record.before, stream, *record.after, *args, *record.constants)
            _counts["record"] += 1
            return
        if callable(meta):
            meta = meta()
        compiled = self.kernel[tuple(grid)](*args, **meta)
        _counts["jit"] += 1
        if interpreted() or self.constexpr_names is None or not _has_launcher(compiled):
            return
        if len(self.records) >= MAX_RECORDS:
            self.records.pop(next(iter(self.records)))
        grid3 = (*grid, *(1,) * (3 - len(grid)))
        constants = tuple(meta[name] for name in self.constexpr_names)
        self.records[key] = _Record(compiled, grid3, constants, len(args) + len(constants))


def _has_launcher(compiled: Any) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))
