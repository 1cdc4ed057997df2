"""Kernel plans and their launch geometry: tile shapes, splits and warps, from shapes alone.

Two tilings cover every layout (see ``layout.py``):

* channel-major — one channel per program along grid axis 0; a tile is [BLOCK_R rows of the batch,
  BLOCK_K spatial elements] of that channel (coalesced along the spatial axis of NCHW);
* column — BLOCK_K channels per program; a tile is [BLOCK_R rows, BLOCK_K channels] of an (N·S, C)
  matrix (coalesced along C for channels_last and 2-D inputs).

Along grid axis 1 a channel's tiles are split into ``split`` contiguous ranges of
``blocks_per_split`` tiles each, so that C × split programs fill the GPU.

A tile's element (r, k) lies at r·stride_r + k·stride_k (+ the channel's stride_c, channel-major).
Triton tells the compiler which integer arguments are multiples of 16, nothing finer: with
S = 196 (14×14) or a row of C = 120 channels the compiler cannot prove a run of four fp32 in a
tile row 16-byte aligned, nor the mask k < K uniform over it, and loads element by element.
``Geometry.align`` is the power of two those values share, which the kernels make visible to the
compiler (``tiling.tile_offsets``); it depends on the shape and strides alone, and whether the
data pointers are 16-byte aligned the compiler learns from Triton's own specialization.

``KERNEL_PLANS`` is the dispatcher's vocabulary: one entry a plan. ``Tunables`` holds the
thresholds below (their defaults); a tuning table may give a plan other values for a shape, and
``plan_token`` / ``parse_plan`` carry a plan with its tunables as one string (what the dispatcher
hands the kernels). This module is plain Python on shapes; it imports no Triton.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from .layout import Layout

# One program of the fused-small plan holds its whole slab in registers: 16,384 fp32 values over
# 16 warps is 32 registers a thread for x (64 with dy in the backward) of the 128 a thread has at
# 512 threads an SM. (256, 16, 8, 8), the second LeNet conv layer, is exactly this size. Compiled
# for sm_90, its backward fills the 128 registers and, with sigmoid, silu or tanh fused, spills
# 16-24 bytes a thread under Triton 3.8 and 64-128 under Triton 3.6 (bench/kernel_resources.py;
# bench/results/kernel-resources/): whether a smaller tile pays there is for a GPU to measure.
FUSED_MAX_TILE = 16384
# The fused-small plan aims at this many elements a program in the column tiling, trading fewer
# launches' worth of work per program for more programs on a small layer.
FUSED_COLUMN_TILE = 4096
# ... with at least one 32-byte sector of fp32 (8 channels) a row: narrower columns of a row-major
# matrix fetch sectors that neighbouring programs fetch again. On a layer of at most
# FUSED_NARROW_LAYER elements (LeNet's channels_last conv2 is 262,144) the launches, not the
# memory transactions, set the time, and those sectors come again from L2: there a slab too tall
# for 8 columns takes fewer rather than three launches each way.
FUSED_MIN_COLUMNS = 8
FUSED_NARROW_LAYER = 1 << 20
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
# 32 warps of 32 threads: the most threads a CUDA block may have.
MAX_NUM_WARPS = 32


@dataclass(frozen=True)
class Tunables:
    """The thresholds a plan's geometry reads; the defaults are the module constants above.

    A tuning table (``tritonbn.tuning``) may give other values for a shape bucket; without one
    every launch uses ``DEFAULT_TUNABLES`` and behaves as these constants say. ``num_warps`` None
    means "by tile size" (4 up to 1,024 elements, 8 up to 4,096, else 16).
    """

    fused_max_tile: int = FUSED_MAX_TILE
    tile: int = TILE
    max_spatial_block: int = MAX_SPATIAL_BLOCK
    max_column_block: int = MAX_COLUMN_BLOCK
    reduction_programs_per_sm: int = REDUCTION_PROGRAMS_PER_SM
    elementwise_programs_per_sm: int = ELEMENTWISE_PROGRAMS_PER_SM
    num_warps: int | None = None

    def __post_init__(self) -> None:
        for name in TUNABLE_FIELDS:
            value = getattr(self, name)
            if name == "num_warps" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tunable {name} must be a positive int, got {value!r}")
        for name in ("fused_max_tile", "tile", "max_spatial_block", "max_column_block", "num_warps"):
            value = getattr(self, name)
            if value is not None and value & (value - 1):
                raise ValueError(f"tunable {name} must be a power of two, got {value}")
        if self.num_warps is not None and self.num_warps > MAX_NUM_WARPS:
            # Triton compiles more, but a CUDA block holds at most 1,024 threads: the launch fails.
            raise ValueError(f"tunable num_warps must be at most {MAX_NUM_WARPS}, got {self.num_warps}")
        # Launch-site keys hold the tunables and are hashed on every launch: hash once.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, name) for name in TUNABLE_FIELDS)))

    def __hash__(self) -> int:
        return self._hash

    def changes(self) -> dict[str, int]:
        """The fields that differ from the defaults, in field order."""
        return {
            name: getattr(self, name)
            for name in TUNABLE_FIELDS
            if getattr(self, name) != getattr(DEFAULT_TUNABLES, name)
        }

    def encode(self) -> str:
        """``"tile=8192,num_warps=4"``: the non-default fields ("" for the defaults)."""
        return ",".join(f"{name}={value}" for name, value in self.changes().items())

    @staticmethod
    def decode(text: str) -> Tunables:
        """The inverse of :meth:`encode`. Raises ValueError on an unknown field or a bad value."""
        values: dict[str, int] = {}
        for item in filter(None, text.split(",")):
            name, sep, value = item.partition("=")
            if not sep or name not in TUNABLE_FIELDS:
                raise ValueError(f"unknown tunable {item!r}; known: {', '.join(TUNABLE_FIELDS)}")
            values[name] = int(value)
        return Tunables(**values) if values else DEFAULT_TUNABLES


TUNABLE_FIELDS = (
    "fused_max_tile",
    "tile",
    "max_spatial_block",
    "max_column_block",
    "reduction_programs_per_sm",
    "elementwise_programs_per_sm",
    "num_warps",
)
DEFAULT_TUNABLES = Tunables()


def column_tiling(layout: Layout) -> bool:
    """Whether the automatic plans tile ``layout`` by columns (channels contiguous)."""
    return layout.name in ("channels_last", "2d")


# Plain integer helpers: triton.cdiv and triton.next_power_of_2 cost microseconds a call on the
# launch path (they are constexpr functions in recent Triton).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# The memory system moves 32-byte sectors; the cost model counts them in fp32 elements' worth.
SECTOR_BYTES = 32
MODEL_ITEMSIZE = 4


@functools.lru_cache(maxsize=1024)
def _row_sectors(s: int, block: int) -> float:
    """Sectors a program's loads touch to read one row of S contiguous fp32 elements in pieces
    of ``block``, on average over where rows start (row r at byte r·S·4 of a channel's plane):
    a piece that straddles a sector boundary costs both sectors."""
    row_bytes = s * MODEL_ITEMSIZE
    starts = [(row * row_bytes) % SECTOR_BYTES for row in range(SECTOR_BYTES)]
    total = 0
    for start in starts:
        for first in range(0, s, block):
            low = start + first * MODEL_ITEMSIZE
            high = start + min(s, first + block) * MODEL_ITEMSIZE
            total += (high - 1) // SECTOR_BYTES - low // SECTOR_BYTES + 1
    return total / len(starts)


def _spatial_block(s: int, n: int, tile: int = TILE, max_block: int = MAX_SPATIAL_BLOCK) -> int:
    """Power-of-two spatial block for S elements a row and N rows (channel-major tiling).

    Minimizes the memory a channel costs, in 32-byte sectors touched (a piece of a row that
    straddles a sector boundary fetches both, and narrow pieces of a row whose length is no
    multiple of 8 fp32 mostly do), plus a fixed cost a tile (TILE_OVERHEAD elements' worth); the
    larger block on ties. Masked lanes past a row's end load nothing and count only through the
    tiles they make. At N = 256: S = 49 gets 64 (one piece a row, about 7 sectors, where pieces
    of 8 would touch about 12), S = 196 gets 256, S = 576 gets 64 (rows aligned, no padding); a small
    batch of large images gets wide blocks rather than many tiny tiles.
    """
    best, best_cost = 1, None
    block = 1
    while block <= min(max_block, _pow2(s)):
        block_r = max(1, min(_pow2(n), tile // block))
        tiles = cdiv(n, block_r) * cdiv(s, block)
        sectors = n * _row_sectors(s, block)
        cost = sectors * SECTOR_BYTES / MODEL_ITEMSIZE + tiles * TILE_OVERHEAD
        if best_cost is None or cost <= best_cost:
            best, best_cost = block, cost
        block *= 2
    return best


def _num_warps(tile: int, override: int | None = None) -> int:
    if override is not None:
        return override
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
    # The largest power of two, at most 16, dividing K, stride_r and (channel-major) stride_c when
    # the key axis is contiguous (stride_k = 1), else 1: rows of `align` elements start aligned.
    align: int = 1

    @property
    def grid(self) -> tuple[int, int]:
        return (self.groups, self.split)

    def args(self) -> tuple[int, ...]:
        return (
            self.rows,
            self.keys,
            self.key_blocks,
            self.stride_r,
            self.stride_k,
            self.stride_c,
            self.blocks_per_split,
        )

    def fitted(self, programs: int) -> Geometry:
        """This tiling with its channel groups' tiles re-split so that at most ``programs``
        programs run (at least one a group): itself when it has no more than that already."""
        if self.groups * self.split <= programs:
            return self
        split, per_split = _split(cdiv(self.rows, self.block_r) * self.key_blocks, self.groups, programs)
        return dataclasses.replace(self, split=split, blocks_per_split=per_split)

    def meta(self) -> dict[str, object]:
        return {
            "BLOCK_R": self.block_r,
            "BLOCK_K": self.block_k,
            "CHANNEL_MAJOR": self.channel_major,
            "INT64": self.int64,
            "ALIGN": self.align,
            "num_warps": self.num_warps,
        }


@functools.lru_cache(maxsize=1024)
def geometry(
    layout: Layout,
    *,
    channel_major: bool,
    sm_count: int,
    programs_per_sm: int | None = None,
    single_tile: bool = False,
    force_int64: bool = False,
    tunables: Tunables = DEFAULT_TUNABLES,
) -> Geometry:
    """The tiling of ``layout``; ``single_tile`` makes one tile hold a whole channel group.

    ``programs_per_sm`` defaults to ``tunables.reduction_programs_per_sm``; ``tunables`` gives
    the tile, block and warp thresholds. Cached: a training loop computes each layer's geometry
    once."""
    if programs_per_sm is None:
        programs_per_sm = tunables.reduction_programs_per_sm
    tile = tunables.tile
    if channel_major:
        block_k = (
            _pow2(layout.s)
            if single_tile
            else _spatial_block(layout.s, layout.n, tile, tunables.max_spatial_block)
        )
        block_r = _pow2(layout.n) if single_tile else max(1, min(_pow2(layout.n), tile // block_k))
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
            block_r, block_k = _fused_column_block(rows, keys, tunables.fused_max_tile)
        else:
            block_k = min(_pow2(keys), tunables.max_column_block)
            block_r = max(1, min(_pow2(rows), tile // block_k))
        key_blocks = 1
        groups = cdiv(keys, block_k)
    blocks = cdiv(rows, block_r) * key_blocks
    split, per_split = (1, 1) if single_tile else _split(blocks, groups, programs_per_sm * sm_count)
    return Geometry(
        channel_major=channel_major,
        rows=rows,
        keys=keys,
        key_blocks=key_blocks,
        stride_r=stride_r,
        stride_k=stride_k,
        stride_c=layout.stride_c,
        block_r=block_r,
        block_k=block_k,
        groups=groups,
        split=split,
        blocks_per_split=per_split,
        int64=force_int64 or layout.needs_int64,
        num_warps=_num_warps(block_r * block_k, tunables.num_warps),
        align=_alignment(keys, stride_r, layout.stride_c if channel_major else 0) if stride_k == 1 else 1,
    )


def _split(blocks: int, groups: int, programs: int) -> tuple[int, int]:
    """(split, blocks_per_split): each of ``groups`` channel groups' ``blocks`` tiles cut into
    contiguous ranges so that groups × split is at most ``programs`` (at least one range a
    group, at most MAX_GRID_Y). Rounded down: one wave where that many programs fit, rather than
    a second wave of a few programs each doing a whole share (64 channels on 132 SMs at 4 a SM:
    8 a channel, 512 programs, not 9 and 576)."""
    split = min(max(1, programs // groups), blocks)
    per_split = max(cdiv(blocks, split), cdiv(blocks, MAX_GRID_Y))
    return cdiv(blocks, per_split), per_split


def _alignment(*values: int) -> int:
    """The largest power of two, at most 16, that divides every one of ``values``."""
    align = 16
    while any(value % align for value in values):
        align //= 2
    return align


def _fused_column_block(rows: int, channels: int, max_tile: int = FUSED_MAX_TILE) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K) of the fused-small plan's column tile: every row, and as many channels
    as FUSED_COLUMN_TILE suggests (at least FUSED_MIN_COLUMNS, fewer on a small layer whose slab
    would not fit ``max_tile`` otherwise)."""
    block_r = _pow2(rows)
    block_k = min(_pow2(channels), max(FUSED_MIN_COLUMNS, FUSED_COLUMN_TILE // block_r))
    if block_r * block_k > max_tile and rows * channels <= FUSED_NARROW_LAYER:
        block_k = max(1, max_tile // block_r)
    return block_r, block_k


def fused_tile_elements(layout: Layout, tunables: Tunables = DEFAULT_TUNABLES) -> int:
    """Elements of the single tile the fused-small plan loads for ``layout`` (the geometry that
    runs: ``geometry(..., single_tile=True, tunables=tunables)`` builds the same tile)."""
    if column_tiling(layout):
        block_r, block_k = _fused_column_block(layout.rows, layout.c, tunables.fused_max_tile)
        return block_r * block_k
    return _pow2(layout.n) * _pow2(layout.s)


@dataclass(frozen=True)
class KernelPlan:
    """One way to run batch norm on the kernels: what the dispatcher chooses among, what
    ``explain()`` reports and what ``ops`` launches.

    ``tiling`` is ``"channel-major"``, ``"column"`` or ``"by layout"`` (column tiles for rows of
    contiguous channels, channel-major otherwise); ``single_tile`` plans hold a channel group's
    whole slab in one program (one launch each way), the others split it across programs (a
    statistics or gradient-sums launch whose last program combines, then an elementwise one).
    ``refusal(layout, training, tunables=DEFAULT_TUNABLES)`` says why the plan cannot run an
    input with those tunables (None: it can);
    ``preferred(layout, training)`` whether the automatic dispatcher takes it when it can, in
    table order.
    """

    name: str
    idea: str
    tiling: str
    single_tile: bool
    forward_launches: int
    backward_launches: int
    refusal: Callable[..., str | None]
    preferred: Callable[[Layout, bool], bool]

    def channel_major(self, layout: Layout) -> bool:
        """Whether this plan tiles ``layout`` channel-major (else by columns)."""
        if self.tiling == "by layout":
            return not column_tiling(layout)
        return self.tiling == "channel-major"


def _refuse_unless_training(
    layout: Layout, training: bool, tunables: Tunables = DEFAULT_TUNABLES
) -> str | None:
    return None if training else "eval mode always runs the 'eval' plan"


def _refuse_large_slab(layout: Layout, training: bool, tunables: Tunables = DEFAULT_TUNABLES) -> str | None:
    tile = fused_tile_elements(layout, tunables)
    if tile > tunables.fused_max_tile:
        return (
            f"needs a per-program tile of at most {tunables.fused_max_tile} elements, this input needs {tile}"
        )
    return _refuse_unless_training(layout, training)


def _refuse_scattered_rows(
    layout: Layout, training: bool, tunables: Tunables = DEFAULT_TUNABLES
) -> str | None:
    if not layout.rows_collapse:
        return f"needs rows at one stride apart (2-D or channels_last input), got layout {layout.name!r}"
    return _refuse_unless_training(layout, training)


def _refuse_training(layout: Layout, training: bool, tunables: Tunables = DEFAULT_TUNABLES) -> str | None:
    return "normalizes with running statistics: training must be False" if training else None


# The automatic dispatcher takes the first plan, in this order, that can run an input and prefers
# it. Adding a plan is adding an entry (and, for a new kind of kernel, its launchers in ops.py).
KERNEL_PLANS: dict[str, KernelPlan] = {
    plan.name: plan
    for plan in (
        KernelPlan(
            "eval",
            "one elementwise pass with per-channel scale and shift from the running statistics",
            tiling="by layout",
            single_tile=False,
            forward_launches=1,
            backward_launches=2,
            refusal=_refuse_training,
            preferred=lambda layout, training: True,
        ),
        KernelPlan(
            "fused-small",
            "one program holds a channel group's whole slab: statistics, "
            "normalization and running statistics in one launch, the backward in one more",
            tiling="by layout",
            single_tile=True,
            forward_launches=1,
            backward_launches=1,
            refusal=_refuse_large_slab,
            preferred=lambda layout, training: True,
        ),
        KernelPlan(
            "column-tiled",
            "tiles coalesced along C over rows of contiguous channels, the rows "
            "split across programs whose last one merges the partials",
            tiling="column",
            single_tile=False,
            forward_launches=2,
            backward_launches=2,
            refusal=_refuse_scattered_rows,
            preferred=lambda layout, training: column_tiling(layout),
        ),
        KernelPlan(
            "split-welford",
            "each channel split across programs (Welford partials merged with "
            "Chan's formula by the last program), then an elementwise pass",
            tiling="channel-major",
            single_tile=False,
            forward_launches=2,
            backward_launches=2,
            refusal=_refuse_unless_training,
            preferred=lambda layout, training: True,
        ),
    )
}
PLANS = tuple(KERNEL_PLANS)


class PlanName(str):
    """A plan's name (it compares, hashes and prints as the bare name, so ``plan.kernel in PLANS``
    holds) that also carries the token of the plan with its tunables, ``token``. The dispatcher
    hands it out in eager mode; the kernels read the token."""

    __slots__ = ("token",)
    token: str

    def __new__(cls, name: str, token: str) -> PlanName:
        self = super().__new__(cls, name)
        self.token = token
        return self

    def __reduce__(self) -> tuple[object, ...]:
        return (PlanName, (str(self), self.token))


def plan_token(name: str, tunables: Tunables = DEFAULT_TUNABLES) -> str:
    """One string for plan ``name`` with ``tunables``: the bare name for the defaults, else
    ``"name@field=value,..."``. :func:`parse_plan` reads it back."""
    encoded = tunables.encode()
    return f"{name}@{encoded}" if encoded else str(name)


@functools.lru_cache(maxsize=256)
def _parse(token: str) -> tuple[KernelPlan, Tunables]:
    name, _, encoded = token.partition("@")
    if name not in KERNEL_PLANS:
        raise ValueError(f"unknown kernel plan {name!r}; known: {', '.join(KERNEL_PLANS)}")
    return KERNEL_PLANS[name], Tunables.decode(encoded)


_parsed: dict[str, tuple[KernelPlan, Tunables]] = {}


def parse_plan(plan: str) -> tuple[KernelPlan, Tunables]:
    """(kernel plan, tunables) of a plan name, a :func:`plan_token` or a :class:`PlanName`.
    On the launch path: a plain string costs one dict lookup."""
    if type(plan) is not str:  # a PlanName compares equal to its bare name: read its token
        plan = getattr(plan, "token", None) or str(plan)
    found = _parsed.get(plan)
    if found is None:
        found = _parse(plan)
        if len(_parsed) < 1024:
            _parsed[plan] = found
    return found
