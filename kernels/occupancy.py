"""How many programs of a compiled kernel an SM holds at once, and the split that fits them in one
wave.

The split plans aim at a number of programs an SM (``Tunables.reduction_programs_per_sm`` and
``elementwise_programs_per_sm``), but an SM runs only as many of a kernel's programs at once as
its registers, threads, block slots and shared memory allow: a kernel at 80 registers a thread
and 8 warps fits 3, not 4, and 4·SMs equal programs then take two waves, the second a third
full, where 3·SMs programs with a third more work each take one. So before a split kernel's
first launch on a GPU, :func:`fitted` compiles it (Triton's ``warmup``: no launch), reads its
registers and shared memory from the loaded kernel and, where fewer programs fit than the plan
aims at, re-splits the channels' tiles over the programs that do (``Geometry.fitted``).

Decided once for a kernel on a tiling and a device, by the first launch site that needs it, and
kept for every later site with that tiling. The split sets the order in which partial statistics
merge, so two sites of one tiling that differ only in flags (a module's first call, say, which
leaves the batch count to Python, and its later ones, which give it to the kernel: a variant with
other registers) run the same grid and give the same bits; and every later launch replays its
site's grid.

Without a real GPU (the interpreter, the stand-in driver, whose loaded kernels report no
registers) the geometry is used as planned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .plans import Geometry, cdiv
from .runtime import interpreted, launches_cpu_tensors, stand_in_sm_count

# Registers are allocated to a warp in units of 256 and come from one of an SM's four
# sub-partitions, each a quarter of the SM's register file.
REGISTER_UNIT = 256
SUB_PARTITIONS = 4
WARP_SIZE = 32
# Resident blocks an SM holds at most, by compute capability (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"); 16 where the capability is not listed.
MAX_BLOCKS = {(7, 0): 32, (7, 5): 16, (8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32}
DEFAULT_MAX_BLOCKS = 16
# Shared memory the driver reserves for each block from compute capability 8.0 on.
RESERVED_SHARED = 1024


@dataclass(frozen=True)
class SMLimits:
    """What one multiprocessor of a device holds at once, and how many it has."""

    count: int
    registers: int
    threads: int
    blocks: int
    shared: int  # bytes
    reserved_shared: int  # bytes a block costs besides its own


def resident_programs(registers: int, num_warps: int, shared: int, limits: SMLimits) -> int:
    """Programs (blocks) of a kernel using ``registers`` (at least 1) a thread, ``num_warps``
    warps and ``shared`` bytes of shared memory that one SM with ``limits`` runs at once (at
    least 1)."""
    per_warp = cdiv(registers * WARP_SIZE, REGISTER_UNIT) * REGISTER_UNIT
    warps = SUB_PARTITIONS * ((limits.registers // SUB_PARTITIONS) // per_warp)
    fits = min(warps // num_warps, limits.threads // (num_warps * WARP_SIZE), limits.blocks)
    if shared + limits.reserved_shared:
        fits = min(fits, limits.shared // (shared + limits.reserved_shared))
    return max(1, fits)


@functools.cache
def sm_limits(device: torch.device) -> SMLimits:
    """The limits of ``device``'s SMs: from CUDA's device properties, or those of an sm_90 GPU
    with the stand-in driver's SM count off the GPU."""
    if device.type != "cuda":
        return SMLimits(stand_in_sm_count(), 65536, 2048, 32, 233472, RESERVED_SHARED)
    props = torch.cuda.get_device_properties(
        device.index if device.index is not None else torch.cuda.current_device()
    )
    capability = (props.major, props.minor)
    return SMLimits(
        count=props.multi_processor_count,
        registers=props.regs_per_multiprocessor,
        threads=props.max_threads_per_multi_processor,
        blocks=MAX_BLOCKS.get(capability, DEFAULT_MAX_BLOCKS),
        shared=props.shared_memory_per_multiprocessor,
        reserved_shared=RESERVED_SHARED if capability >= (8, 0) else 0,
    )


def kernel_registers(compiled: Any) -> int:
    """Registers a thread of ``compiled`` uses, as the driver that loaded it reports (0 where it
    reports none, as the stand-in driver does)."""
    compiled.run  # noqa: B018 (loads the kernel: the driver then reports its registers)
    return int(getattr(compiled, "n_regs", 0) or 0)


# The geometry each (launcher, launch site) runs with, and each (launcher, planned geometry,
# device) was fitted to, once decided. The decision is the second's; the first holds it under the
# site's small key, looked up on every launch, where hashing a Geometry would cost.
MAX_FITTED = 4096
_fitted: dict[tuple[object, Hashable], Geometry] = {}
_decided: dict[tuple[object, Geometry, torch.device], Geometry] = {}


def fitted(
    launcher: Any,
    key: Hashable,
    geo: Geometry,
    device: torch.device,
    args: Callable[[Geometry], Sequence[object]],
    meta: Callable[[], dict[str, object]],
) -> Geometry:
    """The geometry launch site ``key`` of ``launcher`` (a ``launch.Launcher``) runs with: ``geo``
    re-split to the programs the GPU's SMs hold at once when fewer than ``geo``'s fit, else
    ``geo``. ``args(g)`` are the kernel's runtime arguments on geometry ``g`` and ``meta()`` its
    constexprs, as the launch will pass them; decided at the first call of the first site with
    this tiling on ``device``, and kept."""
    found = _fitted.get((launcher, key))
    if found is None:
        found = _decided.get((launcher, geo, device))
        if found is None:
            found = _fit(launcher.kernel, geo, device, args, meta)
            _keep(_decided, (launcher, geo, device), found)
        _keep(_fitted, (launcher, key), found)
    return found


def _keep(cache: dict, key: object, value: Geometry) -> None:
    if len(cache) >= MAX_FITTED:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _fit(
    kernel: Any,
    geo: Geometry,
    device: torch.device,
    args: Callable[[Geometry], Sequence[object]],
    meta: Callable[[], dict[str, object]],
) -> Geometry:
    if geo.split == 1 or interpreted() or (device.type != "cuda" and not launches_cpu_tensors()):
        return geo
    try:
        compiled = kernel.warmup(*args(geo), grid=geo.grid, **meta())
        registers = kernel_registers(compiled)
    except Exception:  # let the launch itself compile and raise what is wrong
        return geo
    if not registers:
        return geo
    limits = sm_limits(device)
    per_sm = resident_programs(registers, geo.num_warps, int(compiled.metadata.shared), limits)
    return geo.fitted(per_sm * limits.count)
