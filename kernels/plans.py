"""Kernel plans and their launch geometry: tile shapes, splits and warps, from shapes alone.

Two tilings cover every layout (see ``layout.py``):

* channel-major — one channel per program along grid axis 0; a tile is [BLOCK_R rows of the batch,
  BLOCK_K spatial elements] of that channel (coalesced along the spatial axis of NCHW);
* column — BLOCK_K channels per program; a tile is [BLOCK_R rows, BLOCK_K channels] of an (N·S, C)
  matrix (coalesced along C for channels_last and 2-D inputs).

Along grid axis 1 a channel's tiles are split into ``split`` contiguous ranges of
``blocks_per_split`` tiles each, so that C × split programs fill the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .layout import Layout

PLANS = ("fused-small", "split-welford", "column-tiled", "eval")

# One program of the fused-small plan holds its whole slab in registers: 16,384 fp32 values over
# 16 warps is 32 registers a thread for x (64 with dy in the backward) of the 128 a thread has at
# 512 threads an SM. (256, 16, 8, 8), the second LeNet conv layer, is exactly this size. Compiled
# offline for sm_90, the backward at this size spills 16-40 bytes a thread with some activations:
# a candidate for tuning once a GPU can measure it.
FUSED_MAX_TILE = 16384
# The fused-small plan aims at this many elements a program in the column tiling, trading fewer
# launches' worth of work per program for more programs on a small layer.
FUSED_COLUMN_TILE = 4096
# ... but never fewer channels a program than one 32-byte sector of fp32 (8): narrower columns of a
# row-major matrix would waste most of each memory transaction.
FUSED_MIN_COLUMNS = 8
# Elements per tile in the split and elementwise kernels: 16 fp32 a thread at 8 warps, enough
# loads in flight per thread to saturate HBM without spilling.
TILE = 4096
# Widest spatial block of the channel-major tiling and widest channel block of the column tiling.
MAX_SPATIAL_BLOCK = 1024
MAX_COLUMN_BLOCK = 64
# The fixed cost of a tile (index math, loop, reductions) in elements' worth of loading.
TILE_OVERHEAD = 256
# Programs per SM to aim for: reductions write one partial per program, elementwise passes loop.
REDUCTION_PROGRAMS_PER_SM = 4
ELEMENTWISE_PROGRAMS_PER_SM = 8
MAX_GRID_Y = 65535
# Channels a program of the per-channel combine kernels (statistics, backward sums) handles.
COMBINE_BLOCK = 128


def column_tiling(layout: Layout) -> bool:
    """Whether the automatic plans tile ``layout`` by columns (channels contiguous)."""
    return layout.name in ("channels_last", "2d")


# Plain integer helpers: triton.cdiv and triton.next_power_of_2 cost microseconds a call on the
# launch path (they are constexpr functions in recent Triton).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _spatial_block(s: int, n: int) -> int:
    """Power-of-two spatial block for S elements a row and N rows (channel-major tiling).

    Minimizes the padded elements loaded plus a fixed cost a tile (TILE_OVERHEAD elements' worth),
    the larger block on ties: S = 49 gets 64, S = 576 gets 64 (no padding), and a small batch of
    large images gets wide blocks rather than many tiny tiles.
    """
    best, best_cost = 1, None
    block = 1
    while block <= min(MAX_SPATIAL_BLOCK, _pow2(s)):
        block_r = max(1, min(_pow2(n), TILE // block))
        tiles = cdiv(n, block_r) * cdiv(s, block)
        cost = tiles * (block_r * block + TILE_OVERHEAD)
        if best_cost is None or cost <= best_cost:
            best, best_cost = block, cost
        block *= 2
    return best


def _num_warps(tile: int) -> int:
    if tile <= 1024:
        return 4
    if tile <= 4096:
        return 8
    return 16


@dataclass(frozen=True)
class Geometry:
    """Everything a launch needs about the tiling; ``args`` go to the kernels in this order."""

    channel_major: bool
    rows: int  # R: batch rows (channel-major) or N·S rows (column)
    keys: int  # K: spatial extent (channel-major) or C (column)
    key_blocks: int  # KB: spatial blocks per row (channel-major), 1 (column)
    stride_r: int
    stride_k: int
    stride_c: int
    block_r: int
    block_k: int
    groups: int  # programs along axis 0
    split: int  # programs along axis 1
    blocks_per_split: int
    int64: bool
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.groups, self.split)

    def args(self) -> tuple[int, ...]:
        return (
            self.rows, self.keys, self.key_blocks, self.stride_r, self.stride_k, self.stride_c,
            self.blocks_per_split,
        )

    def meta(self) -> dict[str, object]:
        return {
            "BLOCK_R": self.block_r,
            "BLOCK_K": self.block_k,
            "CHANNEL_MAJOR": self.channel_major,
            "INT64": self.int64,
            "num_warps": self.num_warps,
        }


@functools.lru_cache(maxsize=1024)
def geometry(
    layout: Layout,
    *,
    channel_major: bool,
    sm_count: int,
    programs_per_sm: int = REDUCTION_PROGRAMS_PER_SM,
    single_tile: bool = False,
    force_int64: bool = False,
) -> Geometry:
    """The tiling of ``layout``; ``single_tile`` makes one tile hold a whole channel group.
    Cached: a training loop computes each layer's geometry once."""
    if channel_major:
        block_k = _pow2(layout.s) if single_tile else _spatial_block(layout.s, layout.n)
        block_r = _pow2(layout.n) if single_tile else max(1, min(_pow2(layout.n), TILE // block_k))
        rows, keys = layout.n, layout.s
        stride_r, stride_k = layout.stride_n, layout.stride_s
        key_blocks = cdiv(keys, block_k)
        groups = layout.c
    else:
        if not layout.rows_collapse:
            raise ValueError(f"the column tiling needs collapsible rows, got layout {layout.name}")
        rows, keys = layout.rows, layout.c
        stride_r, stride_k = layout.row_stride, layout.stride_c
        if single_tile:
            block_r = _pow2(rows)
            block_k = min(_pow2(keys), max(FUSED_MIN_COLUMNS, FUSED_COLUMN_TILE // block_r))
        else:
            block_k = min(_pow2(keys), MAX_COLUMN_BLOCK)
            block_r = max(1, min(_pow2(rows), TILE // block_k))
        key_blocks = 1
        groups = cdiv(keys, block_k)
    blocks = cdiv(rows, block_r) * key_blocks
    if single_tile:
        split, per_split = 1, 1
    else:
        split = min(max(1, cdiv(programs_per_sm * sm_count, groups)), blocks)
        per_split = max(cdiv(blocks, split), cdiv(blocks, MAX_GRID_Y))
        split = cdiv(blocks, per_split)
    return Geometry(
        channel_major=channel_major, rows=rows, keys=keys, key_blocks=key_blocks,
        stride_r=stride_r, stride_k=stride_k, stride_c=layout.stride_c,
        block_r=block_r, block_k=block_k, groups=groups, split=split,
        blocks_per_split=per_split, int64=force_int64 or layout.needs_int64,
        num_warps=_num_warps(block_r * block_k),
    )


def fused_tile_elements(layout: Layout) -> int:
    """Elements of the single tile the fused-small plan would load for ``layout``."""
    if column_tiling(layout):
        return _pow2(layout.rows) * min(_pow2(layout.c), FUSED_MIN_COLUMNS)
    return _pow2(layout.n) * _pow2(layout.s)
