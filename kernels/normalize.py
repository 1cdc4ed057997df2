"""The elementwise forward pass: y = act((x − mean)·invstd·γ + β) per channel, with invstd saved
by ``stats`` (training normalize of the split plans) or rsqrt(running_var + eps) folded in-kernel
(the one-launch eval forward); ``act`` is the fused activation (none by default), applied after
an optional residual r: y = act((x − mean)·invstd·γ + β + r).
"""

import torch
import triton
import triton.language as tl

from .activation import activate
from .launch import Launcher
from .normalization import Normalization
from .occupancy import fitted
from .plans import Geometry
from .tiling import affine_rows, tile_offsets


@triton.jit
def normalize_kernel(
    x_ptr,
    y_ptr,
    residual_ptr,
    stats_ptr,
    var_ptr,
    weight_ptr,
    bias_ptr,
    C,
    eps,
    slope,
    R,
    K,
    KB,
    stride_r,
    stride_k,
    stride_c,
    BLOCKS_PER_SPLIT,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHANNEL_MAJOR: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,
    STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # y = act((x − mean)·a + b [+ r]) with per-channel a = invstd·γ and b = β, loaded once per
    # program and broadcast over its tiles; r is the optional residual, read like x.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean, a, b = affine_rows(
        stats_ptr,
        var_ptr,
        weight_ptr,
        bias_ptr,
        eps,
        pid_k,
        C,
        BLOCK_K,
        CHANNEL_MAJOR,
        STATS,
        HAS_WEIGHT,
        HAS_BIAS,
    )
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(
            pid_k,
            first + i,
            R,
            K,
            KB,
            stride_r,
            stride_k,
            stride_c,
            BLOCK_R,
            BLOCK_K,
            CHANNEL_MAJOR,
            INT64,
            ALIGN,
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * a + b
        if HAS_RESIDUAL:
            z = z + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = activate(z, ACTIVATION, slope)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


launch_normalize = Launcher(normalize_kernel)


def normalize(
    x: torch.Tensor, geo: Geometry, norm: Normalization, *, key: object, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """y = act((x − mean)·invstd·weight + bias [+ residual]) in ``x``'s dtype and strides;
    ``residual`` has x's shape and strides; ``key`` names the launch site."""
    y = torch.empty_like(x)

    def args(geo: Geometry) -> tuple[object, ...]:
        return (x, y, residual, *norm.args(x.shape[1]), *geo.args())

    def meta() -> dict[str, object]:
        return {**norm.meta(), "HAS_RESIDUAL": residual is not None, **geo.meta()}

    geo = fitted(launch_normalize, key, geo, x.device, args, meta)
    launch_normalize(key, geo.grid, args(geo), meta)
    return y
