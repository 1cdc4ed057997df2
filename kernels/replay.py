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
* where the launch is a plain one (no launch attribute, argument types Triton packs simply, a PTX
  entry that declares what the signature says), the same launch as the driver gets it: kernel
  handle, grid, block, shared memory and the packed kernel parameters with their slots, which
  the glue hands to ``cuLaunchKernelEx`` itself (``_driver_launch``);
* which tensors are the pass's outputs and, for a forward, which are saved for the backward.

A pass whose launches have no record (the interpreter, launch hooks installed) has no program.
Workspace tensors enter the tuple as their addresses, the launch keeping the tensors alive; they are
stream-specific and for eager calls only, so the glue runs a program only on the stream it was
recorded on, never into a CUDA graph being captured, and no pass captured into one is recorded.
"""

from __future__ import annotations

import contextlib
import struct
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
        # What the launch must keep alive: its compiled kernel, whose function handle it launches
        # (Triton 3.8 unloads a kernel's module when the kernel is freed, and launch records are
        # evicted), and the workspaces whose addresses it passes.
        kept: list[object] = [record.compiled]
        arguments: list[tuple[int, object]] = []  # each argument as (slot kind, tensor index) or (-1, value)
        for position, arg in enumerate(args, start=len(full)):
            if isinstance(arg, torch.Tensor) and not is_workspace(arg):
                index = index_of(arg)
                if index is None:
                    index = len(tensors)
                    tensors.append(arg)
                    allocations.append((tuple(arg.shape), arg.stride(), arg.dtype))
                full.append(None)
                slots.append((position, POINTER, index))
                arguments.append((POINTER, index))
            elif isinstance(arg, torch.Tensor):  # a workspace: its address, the tensor kept alive
                full.append(arg.data_ptr())
                kept.append(arg)
                arguments.append((-1, arg.data_ptr()))
            elif momentum is not None and arg is momentum:
                full.append(arg)
                slots.append((position, MOMENTUM, 0))
                arguments.append((MOMENTUM, 0))
            else:
                full.append(arg)
                arguments.append((-1, arg))
        full.extend(record.constants)
        arguments.extend((-1, constant) for constant in record.constants)
        direct = _driver_launch(record, arguments)
        launches.append((record.launch, tuple(full), slots, tuple(kept), nest_from, direct))

    def indices(wanted: Sequence[torch.Tensor | None]) -> list[int] | None:
        found = [-1 if t is None else index_of(t) for t in wanted]
        return None if any(i is None for i in found) else found

    output_indices, saved_indices = indices(outputs), indices(saved)
    if output_indices is None or saved_indices is None:
        return None
    return allocations, launches, output_indices, saved_indices


# How Triton's launcher packs a kernel argument of each signature type (its C extractors); a
# pointer's 8 bytes come from a tensor or a workspace address. Other types are not launched here.
_PACKING = {"i32": "<i", "u32": "<I", "i64": "<q", "u64": "<Q", "fp32": "<f"}
# Shared memory above which Triton's launcher adds a launch attribute (its _launch).
_PLAIN_SHARED_MEMORY = 228 * 1024


def _driver_launch(
    record: launch._Record, arguments: Sequence[tuple[int, object]]
) -> tuple[object, ...] | None:
    """The launch as the driver gets it from Triton's launcher, for the glue to make itself
    (``cuLaunchKernelEx``): (kernel handle, grid, threads a block, shared memory bytes, the
    parameters packed at 8-byte steps, each one's offset, slots as (parameter, slot kind, tensor
    index)). None where that launch is not a plain one: launch attributes (clusters,
    programmatic dependent launch, cooperative grid, oversized shared memory), an argument type
    outside ``_PACKING``, or parameters that differ from the kernel's PTX — whose entry must
    declare the signature's non-constexpr arguments, in order and size, then the two scratch
    pointers Triton appends (null: a kernel that needs scratch memory or is instrumented is not
    launched here either)."""
    compiled = record.compiled
    metadata = compiled.metadata
    if getattr(metadata, "num_ctas", 1) != 1 or getattr(metadata, "launch_pdl", False):
        return None
    scratch = (getattr(metadata, name, 1) for name in ("global_scratch_size", "profile_scratch_size"))
    if any(scratch) or "gsan" in str(getattr(metadata, "instrumentation_mode", "")):
        return None
    if getattr(metadata, "launch_cooperative_grid", False) or metadata.shared > _PLAIN_SHARED_MEMORY:
        return None
    types = list(compiled.src.signature.values())
    sizes = launch.parameter_sizes(compiled)
    if sizes is None or len(types) != len(arguments):
        return None
    parameters = [
        (kind, value, "<Q" if t.startswith("*") else _PACKING.get(t))
        for (kind, value), t in zip(arguments, types, strict=True)
        if t != "constexpr"
    ]
    parameters += [(-1, 0, "<Q"), (-1, 0, "<Q")]  # Triton's global and profile scratch: null
    if any(form is None for *_, form in parameters):
        return None
    if sizes != [struct.calcsize(form) for *_, form in parameters]:
        return None
    packed, offsets, slots = bytearray(), [], []
    for number, (kind, value, form) in enumerate(parameters):
        offsets.append(len(packed))
        if kind != -1 and form != ("<Q" if kind == POINTER else "<f"):
            return None  # the glue writes a pointer's 8 bytes and the momentum as a float
        if kind == POINTER:
            slots.append((number, POINTER, value))
            value = 0
        elif kind == MOMENTUM:
            slots.append((number, MOMENTUM, 0))
            value = 0.0
        try:
            packed += struct.pack(form, value)
        except (struct.error, TypeError):
            return None
        packed += bytes(-len(packed) % 8)
    gx, gy, gz = record.grid
    block = 32 * metadata.num_warps
    return compiled.function, (gx, gy, gz), block, metadata.shared, bytes(packed), offsets, slots
