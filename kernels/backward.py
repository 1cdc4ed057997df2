"""Backward of the split plans and of eval mode. With z = (x − mean)·invstd·γ + β recomputed from
the saved input, y = act(z) and dz = dy·act'(z) (dz = dy without an activation), over the n
elements of a channel:

    dβ = Σ dz,    dγ = Σ dz·x̂,    dx = γ·invstd·(dz − Σdz/n − (x − mean)·invstd²·Σ dz·(x − mean)/n)

in training; in eval the running statistics are constants and dx = γ·invstd·dz. Three launches:
fp32 partial sums per program, a combine in split order (dγ, dβ and the dx coefficients), and the
elementwise dx. No atomics: deterministic.
"""

import torch
import triton
import triton.language as tl

from .activation import NONE, activation_grad
from .normalize import Normalization
from .plans import COMBINE_BLOCK, Geometry, cdiv
from .tiling import affine_rows, as_row, load_channel, store_channel, tile_offsets


@triton.jit
def backward_partial_kernel(dy_ptr, x_ptr, sum_dz_ptr, sum_dz_xmu_ptr,
                            mean_ptr, invstd_ptr, weight_ptr, bias_ptr, C, eps, slope,
                            R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                            CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr,
                            INVSTD_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    # Program (g, s): fp32 Σ dz and Σ dz·(x − mean) over its tiles, into row s of the partials,
    # with dz = dy·act'(z) and z = (x − mean)·a + b (a = invstd·γ, b = β).
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean, a, b = affine_rows(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, eps, pid_k, C, BLOCK_K,
                             CHANNEL_MAJOR, INVSTD_IS_VAR, HAS_WEIGHT, HAS_BIAS)
    acc_dz = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_dz_xmu = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xmu = tl.where(mask, x - mean, 0.0)
        dz = activation_grad(dy, xmu * a + b, ACTIVATION, slope)
        acc_dz += tl.sum(dz, axis=0)
        acc_dz_xmu += tl.sum(dz * xmu, axis=0)
    row = split * C
    if CHANNEL_MAJOR:
        acc_dz = tl.sum(acc_dz, axis=0)
        acc_dz_xmu = tl.sum(acc_dz_xmu, axis=0)
    store_channel(sum_dz_ptr + row, acc_dz, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(sum_dz_xmu_ptr + row, acc_dz_xmu, pid_k, C, BLOCK_K, CHANNEL_MAJOR)


@triton.jit
def backward_combine_kernel(sum_dz_ptr, sum_dz_xmu_ptr, SPLIT, C, count,
                            invstd_ptr, grad_weight_ptr, grad_bias_ptr, coef_ptr, eps,
                            BLOCK_C: tl.constexpr, INVSTD_IS_VAR: tl.constexpr,
                            NEEDS_WEIGHT: tl.constexpr, NEEDS_BIAS: tl.constexpr,
                            NEEDS_COEF: tl.constexpr):
    # Sum the partials in split order; dβ = Σdz, dγ = Σdz·(x − mean)·invstd, and the dx
    # coefficients coef[2, C] = (Σdz/n, invstd²·Σdz·(x − mean)/n).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dz_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, SPLIT):
        sum_dz += tl.load(sum_dz_ptr + s * C + c, mask=cmask, other=0.0)
        sum_dz_xmu += tl.load(sum_dz_xmu_ptr + s * C + c, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    if INVSTD_IS_VAR:
        invstd = 1.0 / tl.sqrt(invstd + eps)
    if NEEDS_WEIGHT:
        tl.store(grad_weight_ptr + c, (sum_dz_xmu * invstd).to(grad_weight_ptr.dtype.element_ty),
                 mask=cmask)
    if NEEDS_BIAS:
        tl.store(grad_bias_ptr + c, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=cmask)
    if NEEDS_COEF:
        tl.store(coef_ptr + c, sum_dz / count, mask=cmask)
        tl.store(coef_ptr + C + c, invstd * invstd * sum_dz_xmu / count, mask=cmask)


@triton.jit
def backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, coef_ptr,
                       mean_ptr, invstd_ptr, weight_ptr, bias_ptr, C, eps, slope,
                       R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr,
                       INVSTD_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, TRAINING: tl.constexpr):
    # Training: dx = a·(dz − mean_dz − (x − mean)·k_xmu) with the combine's coefficients;
    # eval: dx = a·dz. a = invstd·γ and dz = dy·act'(z); eval without activation never reads x.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean, a, b = affine_rows(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, eps, pid_k, C, BLOCK_K,
                             CHANNEL_MAJOR, INVSTD_IS_VAR, HAS_WEIGHT, HAS_BIAS)
    if TRAINING:
        mean_dz = as_row(load_channel(coef_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
        k_xmu = as_row(load_channel(coef_ptr + C, pid_k, C, BLOCK_K, CHANNEL_MAJOR),
                       CHANNEL_MAJOR)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        dz = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if TRAINING or ACTIVATION != NONE:
            xmu = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean
            dz = activation_grad(dz, xmu * a + b, ACTIVATION, slope)
            if TRAINING:
                dz = dz - mean_dz - xmu * k_xmu
        tl.store(dx_ptr + offsets, (a * dz).to(dx_ptr.dtype.element_ty), mask=mask)




def backward_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    geo: Geometry,
    norm: Normalization,
    *,
    need_weight: bool,
    need_bias: bool,
    need_coef: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Partials + combine: (grad_weight, grad_bias, coef[2, C]) — each None unless asked for."""
    channels = x.shape[1]
    count = float(x.numel() // channels)
    sums = torch.empty((2, geo.split, channels), device=x.device, dtype=torch.float32)
    backward_partial_kernel[geo.grid](
        dy, x, sums[0], sums[1], *norm.args(channels), *geo.args(), **norm.meta(), **geo.meta()
    )
    grad_weight, grad_bias = norm.parameter_grads(x, need_weight, need_bias)
    coef = torch.empty((2, channels), device=x.device, dtype=torch.float32) if need_coef else None
    backward_combine_kernel[(cdiv(channels, COMBINE_BLOCK),)](
        sums[0], sums[1], geo.split, channels, count, norm.invstd, grad_weight, grad_bias,
        coef, float(norm.eps),
        BLOCK_C=COMBINE_BLOCK, INVSTD_IS_VAR=norm.invstd_is_var, NEEDS_WEIGHT=need_weight,
        NEEDS_BIAS=need_bias, NEEDS_COEF=need_coef, num_warps=4,
    )
    return grad_weight, grad_bias, coef


def backward_dx(
    dy: torch.Tensor, x: torch.Tensor, geo: Geometry, norm: Normalization,
    coef: torch.Tensor | None,
) -> torch.Tensor:
    """dx in ``x``'s dtype and strides: the training formula with ``coef`` from ``backward_sums``,
    the eval one (statistics held constant) when ``coef`` is None."""
    dx = torch.empty_like(x)
    backward_dx_kernel[geo.grid](
        dy, x, dx, coef, *norm.args(x.shape[1]), *geo.args(),
        TRAINING=coef is not None, **norm.meta(), **geo.meta(),
    )
    return dx
