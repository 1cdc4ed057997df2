"""Launch programs: one pass of a launch site, recorded from its Python path, for the C++ glue
(``tritonbn/csrc/eager_glue.cpp``) to replay without Python.

Inside :func:`recording`, every ``launch.Launcher`` call also notes its launcher, record key and
argument tuple. :func:`program` turns the notes of one pass into what the glue runs:

* the tensors the pass allocated (every tensor argument that is neither one of the pass's inputs
  nor a workspace of ``workspace.py``), as (shape, strides, dtype) to allocate again each call;
* each launch as the launch record's call (Triton's C launch function where ``launch._direct``
  found its layout, else the compiled kernel's launcher) and the full argument list it takes —
  grid, stream, kernel, metadata and whatever else the layout has, the kernel's arguments, its
  constexprs — with *slots* where a call's values go: data pointers of inputs and allocations,
  the stream, the momentum (recognized as the very float object the pass was given), and the
  position from which the arguments go as one tuple (-1: flat). Pointers go to the launcher as
  integers, which it takes without asking the driver about them;
* which tensors are the pass's outputs and, for a forward, which are saved for the backward.

A pass whose launches have no record (the interpreter, launch hooks installed) has no program.
Workspace tensors enter the tuple as their addresses, the launch keeping the tensors alive; they are
stream-specific, so the glue runs a program only on the stream it was recorded on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from . import launch
from .workspace import is_workspace

__all__ = ["MOMENTUM", "POINTER", "STREAM", "Program", "program", "recording"]

# Slot kinds (eager_glue.cpp's enum Slot).
POINTER, STREAM, MOMENTUM = 0, 1, 2

Program = tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[int], list[int]]


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[object, ...]]]:
    """Note every launch this thread makes inside the block (not reentrant)."""
    if getattr(launch._recording, "notes", None) is not None:
        raise RuntimeError("launches are already being recorded")
    notes: list[tuple[object, ...]] = []
    launch._recording.notes = notes
    try:
        yield notes
    finally:
        launch._recording.notes = None


def program(
    notes: Sequence[tuple[object, ...]],
    inputs: Sequence[torch.Tensor | None],
    outputs: Sequence[torch.Tensor | None],
    saved: Sequence[torch.Tensor | None] = (),
    momentum: float | None = None,
) -> Program | None:
    """(allocations, launches, output indices, saved indices) of the pass whose launches are
    ``notes``, or None when a launch has no record. Tensors are numbered inputs first, then the
    allocations in the order the launches meet them; an absent output or saved tensor is -1."""
    tensors: list[torch.Tensor | None] = list(inputs)  # an absent input keeps its index, as None
    allocations: list[tuple[object, ...]] = []

    def index_of(tensor: torch.Tensor) -> int | None:
        return next((i for i, known in enumerate(tensors) if known is tensor), None)

    launches = []
    for launcher, key, args in notes:
        record = launcher.records.get(key)
        if record is None:
            return None
        full = [*record.before, None, *record.after]
        slots = [(len(record.before), STREAM, 0)]
        nest_from = len(full) if record.nested else -1
        kept: list[torch.Tensor] = []
        for position, arg in enumerate(args, start=len(full)):
            if isinstance(arg, torch.Tensor) and not is_workspace(arg):
                index = index_of(arg)
                if index is None:
                    index = len(tensors)
                    tensors.append(arg)
                    allocations.append((tuple(arg.shape), arg.stride(), arg.dtype))
                full.append(None)
                slots.append((position, POINTER, index))
            elif isinstance(arg, torch.Tensor):  # a workspace: its address, the tensor kept alive
                full.append(arg.data_ptr())
                kept.append(arg)
            elif momentum is not None and arg is momentum:
                full.append(arg)
                slots.append((position, MOMENTUM, 0))
            else:
                full.append(arg)
        full.extend(record.constants)
        launches.append((record.launch, tuple(full), slots, tuple(kept), nest_from))

    def indices(wanted: Sequence[torch.Tensor | None]) -> list[int] | None:
        found = [-1 if t is None else index_of(t) for t in wanted]
        return None if any(i is None for i in found) else found

    output_indices, saved_indices = indices(outputs), indices(saved)
    if output_indices is None or saved_indices is None:
        return None
    return allocations, launches, output_indices, saved_indices
