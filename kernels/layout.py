"""How a (N, C, *spatial) tensor lies in memory, seen as the 3-D view (N, C, S).

Every kernel addresses its input through this view: S is the product of the spatial sizes and
the spatial dimensions must collapse into one stride. ``describe`` is plain Python on shapes and
strides; it launches nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

INT32_LIMIT = 2**31 - 1
INT64_MARGIN = 1 << 20


@dataclass(frozen=True)
class Layout:
    """The (N, C, S) view of a tensor and what the kernels can do with it.

    ``name`` is one of ``"nchw"`` (spatial elements contiguous), ``"channels_last"`` (channels
    contiguous, rows of C), ``"2d"`` ((N, C) input, or one spatial element with contiguous
    channels) or ``"strided"`` (anything else). The dispatcher copies an input whose strides are
    not those of its ``output_format`` (which every strided one is) into that format first.
    ``rows_collapse`` tells whether the N·S rows of the tensor sit at one stride apart, which the
    column-tiled plan needs.
    """

    name: str
    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def rows(self) -> int:
        """Elements per channel: N·S."""
        return self.n * self.s

    @property
    def rows_collapse(self) -> bool:
        return self.s == 1 or self.n == 1 or self.stride_n == self.s * self.stride_s

    @property
    def row_stride(self) -> int:
        """Stride between consecutive rows m = n·S + s (valid when ``rows_collapse``)."""
        if self.s == 1:
            return self.stride_n
        return self.stride_s

    @property
    def needs_int64(self) -> bool:
        """Whether the largest element offset, plus a safety margin, can pass 2**31 - 1.

        Only in-bounds lanes are ever dereferenced; the int32 offsets of masked lanes past the
        end may wrap, harmlessly. The margin keeps a tensor near the limit on the int64 path.
        """
        largest = (
            (self.n - 1) * abs(self.stride_n)
            + (self.c - 1) * abs(self.stride_c)
            + (self.s - 1) * abs(self.stride_s)
        )
        return largest + INT64_MARGIN > INT32_LIMIT


def _spatial_stride(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """The single stride of the collapsed spatial dims, or None if they don't collapse."""
    dims = [(size, stride) for size, stride in zip(sizes, strides, strict=True) if size != 1]
    if not dims:
        return 1
    expected = dims[-1][1]
    inner = expected
    for size, stride in reversed(dims):
        if stride != expected:
            return None
        expected *= size
    return inner


def _is_dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Non-overlapping and dense: every storage element of its span belongs to the tensor."""
    pairs = sorted((st, sz) for sz, st in zip(shape, strides, strict=True) if sz != 1)
    expected = 1
    for stride, size in pairs:
        if stride != expected:
            return False
        expected *= size
    return True


def describe(x: torch.Tensor) -> Layout:
    """The (N, C, S) layout of ``x`` (at least 2-D); cached by shape and strides, since the
    launchers ask for every call."""
    return _cached_layout(tuple(x.shape), tuple(x.stride()))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _strides_like_channels_last(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """c10's test of whether strides read as channels_last (4-D) or channels_last_3d (5-D):
    increasing along C, then the spatial dims from the last, then N; ambiguous size-1 cases
    read as contiguous, as there."""
    if strides[1] == 0:
        return False
    smallest = 0
    for dim in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[dim] == 0 or strides[dim] < smallest:
            return False
        if dim == 0 and smallest == strides[1]:
            return False
        smallest = strides[dim] * (shape[dim] if shape[dim] > 1 else 1)
    return True


def output_format(shape: tuple[int, ...], strides: tuple[int, ...]) -> torch.memory_format:
    """The memory format of torch's batch-norm output (and input gradient) for an input of
    ``shape`` and ``strides``: its ``suggest_memory_format()`` — channels_last(_3d) for 4-D (5-D)
    input whose strides read so, contiguous for everything else."""
    if len(shape) in (4, 5) and _strides_like_channels_last(shape, strides):
        return torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return torch.contiguous_format


def format_strides(shape: tuple[int, ...], memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides of a tensor of ``shape`` laid out in ``memory_format``."""
    if memory_format == torch.contiguous_format:
        return contiguous_strides(shape)
    # Channels last: C, then the spatial dims, then N, from fastest to slowest.
    order = (1, *range(len(shape) - 1, 1, -1), 0)
    strides, step = [0] * len(shape), 1
    for dim in order:
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def same_strides(shape: tuple[int, ...], strides: tuple[int, ...], others: tuple[int, ...]) -> bool:
    """Whether two stride tuples of ``shape`` address its elements alike (size-1 dims ignored)."""
    return all(size <= 1 or a == b for size, a, b in zip(shape, strides, others, strict=True))


def describe_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> Layout:
    """The (N, C, S) layout of a tensor with ``shape`` and ``strides`` (at least 2-D)."""
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    stride_n, stride_c = strides[0], strides[1]
    spatial = _spatial_stride(shape[2:], strides[2:])
    if c == 1:
        stride_c = 1
    if not _is_dense(shape, strides) or spatial is None:
        return Layout("strided", n, c, s, stride_n, stride_c, spatial or 0)
    layout = Layout("", n, c, s, stride_n, stride_c, spatial)
    if len(shape) == 2 or (s == 1 and stride_c == 1):
        # One spatial element: rows of C contiguous channels, like an (N, C) matrix.
        name = "2d"
    elif s == 1 or spatial == 1:
        name = "nchw"
    elif stride_c == 1 and layout.rows_collapse:
        name = "channels_last"
    else:
        name = "strided"
    return Layout(name, n, c, s, stride_n, stride_c, spatial)


_cached_layout = functools.lru_cache(maxsize=4096)(describe_strides)
