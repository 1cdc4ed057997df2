"""Backward of the split plans. With x̂ = (x − mean)·invstd and n elements per channel:

    dβ = Σ dy,    dγ = Σ dy·x̂,    dx = γ·invstd·(dy − Σdy/n − (x − mean)·invstd²·Σ dy·(x − mean)/n)

Three launches: fp32 partial sums per program, a combine in split order (dγ, dβ and the dx
coefficients), and the elementwise dx. In eval mode the same partials give dγ, dβ with the running
statistics, and dx = dy·γ·invstd comes from ``normalize``. No atomics: deterministic.
"""

import torch
import triton
import triton.language as tl

from .plans import Geometry
from .tiling import as_row, load_channel, tile_offsets


@triton.jit
def backward_partial_kernel(dy_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr, C,
                            R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                            CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr):
    # Program (g, s): fp32 Σ dy and Σ dy·(x − mean) over its tiles, into row s of the partials.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean = as_row(load_channel(mean_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    acc_dy = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_dy_xmu = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xmu = tl.where(mask, x - mean, 0.0)
        acc_dy += tl.sum(dy, axis=0)
        acc_dy_xmu += tl.sum(dy * xmu, axis=0)
    row = split * C
    if CHANNEL_MAJOR:
        tl.store(sum_dy_ptr + row + pid_k, tl.sum(acc_dy, axis=0))
        tl.store(sum_dy_xmu_ptr + row + pid_k, tl.sum(acc_dy_xmu, axis=0))
    else:
        c = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(sum_dy_ptr + row + c, acc_dy, mask=c < C)
        tl.store(sum_dy_xmu_ptr + row + c, acc_dy_xmu, mask=c < C)


@triton.jit
def backward_combine_kernel(sum_dy_ptr, sum_dy_xmu_ptr, SPLIT, C, count,
                            invstd_ptr, weight_ptr, grad_weight_ptr, grad_bias_ptr, coef_ptr, eps,
                            BLOCK_C: tl.constexpr, INVSTD_IS_VAR: tl.constexpr,
                            HAS_WEIGHT: tl.constexpr, NEEDS_WEIGHT: tl.constexpr,
                            NEEDS_BIAS: tl.constexpr, NEEDS_COEF: tl.constexpr):
    # Sum the partials in split order; dβ = Σdy, dγ = Σdy·(x − mean)·invstd, and the dx
    # coefficients coef[3, C] = (γ·invstd, Σdy/n, invstd²·Σdy·(x − mean)/n).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, SPLIT):
        sum_dy += tl.load(sum_dy_ptr + s * C + c, mask=cmask, other=0.0)
        sum_dy_xmu += tl.load(sum_dy_xmu_ptr + s * C + c, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    if INVSTD_IS_VAR:
        invstd = 1.0 / tl.sqrt(invstd + eps)
    if NEEDS_WEIGHT:
        tl.store(grad_weight_ptr + c, (sum_dy_xmu * invstd).to(grad_weight_ptr.dtype.element_ty),
                 mask=cmask)
    if NEEDS_BIAS:
        tl.store(grad_bias_ptr + c, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=cmask)
    if NEEDS_COEF:
        k = invstd
        if HAS_WEIGHT:
            k = k * tl.load(weight_ptr + c, mask=cmask, other=1.0).to(tl.float32)
        tl.store(coef_ptr + c, k, mask=cmask)
        tl.store(coef_ptr + C + c, sum_dy / count, mask=cmask)
        tl.store(coef_ptr + 2 * C + c, invstd * invstd * sum_dy_xmu / count, mask=cmask)


@triton.jit
def backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, coef_ptr, C,
                       R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr):
    # dx = k·(dy − mean_dy − (x − mean)·k_xmu) with the per-channel coefficients of the combine.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean = as_row(load_channel(mean_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    k = as_row(load_channel(coef_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    mean_dy = as_row(load_channel(coef_ptr + C, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    k_xmu = as_row(load_channel(coef_ptr + 2 * C, pid_k, C, BLOCK_K, CHANNEL_MAJOR),
                   CHANNEL_MAJOR)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = k * (dy - mean_dy - (x - mean) * k_xmu)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


COMBINE_BLOCK = 128


def backward_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    geo: Geometry,
    *,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    invstd_is_var: bool,
    eps: float,
    weight: torch.Tensor | None,
    need_weight: bool,
    need_bias: bool,
    need_coef: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Partials + combine: (grad_weight, grad_bias, coef[3, C]) — each None unless asked for."""
    channels = x.shape[1]
    count = float(x.numel() // channels)
    sums = torch.empty((2, geo.split, channels), device=x.device, dtype=torch.float32)
    backward_partial_kernel[geo.grid](
        dy, x, mean, sums[0], sums[1], channels, *geo.args(), **geo.meta()
    )
    param_dtype = weight.dtype if weight is not None else torch.float32
    grad_weight = torch.empty(channels, device=x.device, dtype=param_dtype) if need_weight else None
    grad_bias = torch.empty(channels, device=x.device, dtype=param_dtype) if need_bias else None
    coef = torch.empty((3, channels), device=x.device, dtype=torch.float32) if need_coef else None
    backward_combine_kernel[(triton.cdiv(channels, COMBINE_BLOCK),)](
        sums[0], sums[1], geo.split, channels, count, invstd, weight, grad_weight, grad_bias,
        coef, float(eps),
        BLOCK_C=COMBINE_BLOCK, INVSTD_IS_VAR=invstd_is_var, HAS_WEIGHT=weight is not None,
        NEEDS_WEIGHT=need_weight, NEEDS_BIAS=need_bias, NEEDS_COEF=need_coef, num_warps=4,
    )
    return grad_weight, grad_bias, coef


def backward_dx(
    dy: torch.Tensor, x: torch.Tensor, geo: Geometry, *, mean: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """dx of the training backward, in ``x``'s dtype and strides."""
    dx = torch.empty_like(x)
    backward_dx_kernel[geo.grid](
        dy, x, dx, mean, coef, x.shape[1], *geo.args(), **geo.meta()
    )
    return dx
