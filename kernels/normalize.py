"""The elementwise pass: y = (x − mean)·a·γ + β per channel, with a = invstd, or
a = 1/sqrt(var + eps) folded in-kernel from running statistics. It serves the training normalize
(after ``stats``), the one-launch eval forward, and the eval backward dx = dy·γ/sqrt(var + eps).
"""

import torch
import triton
import triton.language as tl

from .plans import Geometry
from .tiling import as_row, load_channel, tile_offsets


@triton.jit
def normalize_kernel(x_ptr, y_ptr, mean_ptr, scale_ptr, weight_ptr, bias_ptr, C, eps,
                     R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr,
                     HAS_MEAN: tl.constexpr, SCALE_IS_VAR: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # y = (x − mean)·a + b with per-channel a = scale (or rsqrt(var + eps)) · γ and b = β, loaded
    # once per program and broadcast over its tiles.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    a = load_channel(scale_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    if SCALE_IS_VAR:
        a = 1.0 / tl.sqrt(a + eps)
    if HAS_WEIGHT:
        a = a * load_channel(weight_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    a = as_row(a, CHANNEL_MAJOR)
    if HAS_MEAN:
        mean = as_row(load_channel(mean_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    if HAS_BIAS:
        b = as_row(load_channel(bias_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_MEAN:
            x = x - mean
        y = x * a
        if HAS_BIAS:
            y = y + b
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def normalize(
    x: torch.Tensor,
    out: torch.Tensor,
    geo: Geometry,
    *,
    mean: torch.Tensor | None,
    scale: torch.Tensor,
    scale_is_var: bool,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Write (x − mean)·a·weight + bias into ``out`` (same strides as ``x``) and return it."""
    normalize_kernel[geo.grid](
        x, out, mean, scale, weight, bias, x.shape[1], float(eps), *geo.args(),
        HAS_MEAN=mean is not None, SCALE_IS_VAR=scale_is_var,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **geo.meta(),
    )
    return out

