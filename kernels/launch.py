"""Launch records: a Triton kernel launched through its compiled launcher, not the JIT's.

``kernel[grid](*args, **meta)`` binds the arguments, specializes them, hashes a cache key, looks
the compiled kernel up and re-checks every global ``tl.constexpr`` the kernel reads, on every call:
15–27 µs of host time, more than a LeNet layer's GPU time. A launch record does that work once per
*launch site* (which kernel, with which constexprs, on which shapes, dtypes and pointer
alignments): the first launch goes through the JIT, which compiles and returns the compiled
kernel; later launches with the same record key call that kernel's own launcher directly, as
inductor's generated launchers do.

The record key must determine everything the JIT specializes on. Callers build it from the
layout key (shape, strides, dtypes, plan, flags: the integer arguments all derive from it) and
``tensors_key`` of the tensors they pass, since Triton specializes pointers on 16-byte
alignment. Under the interpreter, with launch hooks installed (profilers), or on a Triton whose
compiled kernels lack the launcher API, every launch takes the JIT path.
"""

from __future__ import annotations

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
    """A compiled kernel bound to one launch site: grid, launcher and the constexpr tail."""

    __slots__ = ("constants", "function", "grid", "metadata", "run")

    def __init__(self, compiled: Any, grid: tuple[int, int, int], constants: tuple[object, ...]):
        self.run = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.grid = grid
        self.constants = constants


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
            gx, gy, gz = record.grid
            record.run(
                gx,
                gy,
                gz,
                stream,
                record.function,
                record.metadata,
                None,
                None,
                None,
                *args,
                *record.constants,
            )
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
        self.records[key] = _Record(compiled, grid3, constants)


def _has_launcher(compiled: Any) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))
