"""Training-forward statistics of the split plans: per-program Welford partials, then one combine
that yields mean, invstd, the folded scale/shift of the normalize pass, and the running-statistics
update. Two launches, no atomics: the same input gives the same bits.
"""

import torch
import triton
import triton.language as tl

from .plans import COMBINE_BLOCK, Geometry, cdiv
from .tiling import chan_merge, merge_lanes, store_channel, tile_offsets, tile_welford


@triton.jit
def stats_partial_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, C,
                         R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                         CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr):
    # Program (g, s) folds its range of tiles into fp32 (count, mean, M2) per channel with Chan's
    # merge of each tile's two-pass statistics, and writes them to row s of the [split, C] partials.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    count = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        t_count, t_mean, t_m2 = tile_welford(x, mask)
        count, mean, m2 = chan_merge(count, mean, m2, t_count, t_mean, t_m2)
    row = split * C
    if CHANNEL_MAJOR:
        count, mean, m2 = merge_lanes(count, mean, m2)
    store_channel(count_ptr + row, count, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(mean_ptr + row, mean, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(m2_ptr + row, m2, pid_k, C, BLOCK_K, CHANNEL_MAJOR)


@triton.jit
def stats_combine_kernel(count_ptr, mean_ptr, m2_ptr, SPLIT, C,
                         weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, save_ptr,
                         momentum, eps,
                         BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_RUNNING: tl.constexpr):
    # Merge the partials of each channel in split order (Chan), then
    #   var = M2/n, invstd = 1/sqrt(var + eps), scale = γ·invstd, shift = β,
    # saved as rows 0..3 of save[4, C]; the running statistics are read, then updated last:
    #   running_mean ← (1−m)·running_mean + m·mean, running_var ← (1−m)·running_var + m·var·n/(n−1).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, SPLIT):
        p_count = tl.load(count_ptr + s * C + c, mask=cmask, other=0.0)
        p_mean = tl.load(mean_ptr + s * C + c, mask=cmask, other=0.0)
        p_m2 = tl.load(m2_ptr + s * C + c, mask=cmask, other=0.0)
        count, mean, m2 = chan_merge(count, mean, m2, p_count, p_mean, p_m2)
    var = m2 / tl.maximum(count, 1.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(save_ptr + c, mean, mask=cmask)
    tl.store(save_ptr + C + c, invstd, mask=cmask)
    tl.store(save_ptr + 2 * C + c, scale, mask=cmask)
    tl.store(save_ptr + 3 * C + c, shift, mask=cmask)
    if HAS_RUNNING:
        running_mean = tl.load(running_mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        running_var = tl.load(running_var_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        unbiased = var * count / tl.maximum(count - 1.0, 1.0)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased
        tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty),
                 mask=cmask)
        tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty),
                 mask=cmask)




def batch_statistics(
    x: torch.Tensor,
    geo: Geometry,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Launch partials + combine; returns save[4, C] fp32 = (mean, invstd, scale, shift).

    Updates ``running_mean``/``running_var`` in place when given.
    """
    channels = x.shape[1]
    partials = torch.empty((3, geo.split, channels), device=x.device, dtype=torch.float32)
    stats_partial_kernel[geo.grid](
        x, partials[0], partials[1], partials[2], channels, *geo.args(), **geo.meta()
    )
    save = torch.empty((4, channels), device=x.device, dtype=torch.float32)
    has_running = running_mean is not None
    stats_combine_kernel[(cdiv(channels, COMBINE_BLOCK),)](
        partials[0], partials[1], partials[2], geo.split, channels,
        weight, bias, running_mean, running_var, save, float(momentum), float(eps),
        BLOCK_C=COMBINE_BLOCK, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running, num_warps=4,
    )
    return save
