"""Backward of the split plans and of eval mode. With z = (x − mean)·invstd·γ + β recomputed from
the saved input, y = act(z) and dz = dy·act'(z) (dz = dy without an activation), over the n
elements of a channel:

    dβ = Σ dz,    dγ = Σ dz·x̂,    dx = γ·invstd·(dz − Σdz/n − (x − mean)·invstd²·Σ dz·(x − mean)/n)

in training; in eval the running statistics are constants and dx = γ·invstd·dz. Two launches:
fp32 partial sums per program, merged in split order by the last program of each channel group
(dγ, dβ and the dx coefficients; see ``workspace.py``), then the elementwise dx. No float
atomics: deterministic.
"""

import torch
import triton
import triton.language as tl

from .activation import NONE, activation_grad
from .launch import Launcher
from .normalization import Normalization
from .plans import Geometry
from .tiling import affine_rows, as_row, channel_affine, load_channel, store_channel, tile_offsets
from .workspace import tickets


@triton.jit
def backward_sums_kernel(dy_ptr, x_ptr, partial_ptr, ticket_ptr, grad_weight_ptr, grad_bias_ptr,
                         coef_ptr, stats_ptr, var_ptr, weight_ptr, bias_ptr, C, eps, slope,
                         count, R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT, SPLIT,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                         CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr,
                         STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                         NEEDS_WEIGHT: tl.constexpr, NEEDS_BIAS: tl.constexpr,
                         NEEDS_COEF: tl.constexpr):
    # Program (g, s): fp32 Σ dz and Σ dz·(x − mean) over its tiles, with dz = dy·act'(z) and
    # z = (x − mean)·a + b (a = invstd·γ, b = β), into row s of partials[2, SPLIT, C]. The last
    # program of group g sums rows 0..SPLIT-1 in order: dβ = Σdz, dγ = Σdz·(x − mean)·invstd and
    # the dx coefficients coef[2, C] = (Σdz/n, invstd²·Σdz·(x − mean)/n).
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean, a, b = affine_rows(stats_ptr, var_ptr, weight_ptr, bias_ptr, eps, pid_k, C, BLOCK_K,
                             CHANNEL_MAJOR, STATS, HAS_WEIGHT, HAS_BIAS)
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
    if CHANNEL_MAJOR:
        acc_dz = tl.sum(acc_dz, axis=0)
        acc_dz_xmu = tl.sum(acc_dz_xmu, axis=0)
    plane = SPLIT * C
    store_channel(partial_ptr + split * C, acc_dz, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(partial_ptr + plane + split * C, acc_dz_xmu, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    # Every thread's stores happen before the release of the ticket.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + pid_k, 1, sem="acq_rel") == SPLIT - 1:
        sum_dz = load_channel(partial_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        sum_dz_xmu = load_channel(partial_ptr + plane, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        for s in range(1, SPLIT):
            sum_dz += load_channel(partial_ptr + s * C, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
            sum_dz_xmu += load_channel(partial_ptr + plane + s * C, pid_k, C, BLOCK_K,
                                       CHANNEL_MAJOR)
        _, invstd, _, _ = channel_affine(stats_ptr, var_ptr, weight_ptr, bias_ptr, eps, pid_k, C,
                                         BLOCK_K, CHANNEL_MAJOR, STATS, HAS_WEIGHT, HAS_BIAS)
        if NEEDS_WEIGHT:
            store_channel(grad_weight_ptr, sum_dz_xmu * invstd, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        if NEEDS_BIAS:
            store_channel(grad_bias_ptr, sum_dz, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        if NEEDS_COEF:
            store_channel(coef_ptr, sum_dz / count, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
            store_channel(coef_ptr + C, invstd * invstd * sum_dz_xmu / count, pid_k, C, BLOCK_K,
                          CHANNEL_MAJOR)
        tl.store(ticket_ptr + pid_k, 0)


@triton.jit
def backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, coef_ptr,
                       stats_ptr, var_ptr, weight_ptr, bias_ptr, C, eps, slope,
                       R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr,
                       STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, TRAINING: tl.constexpr):
    # Training: dx = a·(dz − mean_dz − (x − mean)·k_xmu) with the combine's coefficients;
    # eval: dx = a·dz. a = invstd·γ and dz = dy·act'(z); eval without activation never reads x.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean, a, b = affine_rows(stats_ptr, var_ptr, weight_ptr, bias_ptr, eps, pid_k, C, BLOCK_K,
                             CHANNEL_MAJOR, STATS, HAS_WEIGHT, HAS_BIAS)
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




launch_sums = Launcher(backward_sums_kernel)
launch_dx = Launcher(backward_dx_kernel)


def backward_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    geo: Geometry,
    norm: Normalization,
    *,
    need_weight: bool,
    need_bias: bool,
    need_coef: bool,
    key: object,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One launch: (grad_weight, grad_bias, coef[2, C]), each None unless asked for. ``key``
    names the launch site."""
    channels = x.shape[1]
    count = float(x.numel() // channels)
    partials = torch.empty((2, geo.split, channels), device=x.device, dtype=torch.float32)
    grad_weight, grad_bias = norm.parameter_grads(x, need_weight, need_bias)
    coef = torch.empty((2, channels), device=x.device, dtype=torch.float32) if need_coef else None
    launch_sums(
        key, geo.grid,
        (dy, x, partials, tickets(x.device, geo.groups), grad_weight, grad_bias, coef,
         *norm.args(channels), count, *geo.args(), geo.split),
        lambda: {"NEEDS_WEIGHT": need_weight, "NEEDS_BIAS": need_bias, "NEEDS_COEF": need_coef,
         **norm.meta(), **geo.meta()},
    )
    return grad_weight, grad_bias, coef


def backward_dx(
    dy: torch.Tensor, x: torch.Tensor, geo: Geometry, norm: Normalization,
    coef: torch.Tensor | None, *, key: object,
) -> torch.Tensor:
    """dx in ``x``'s dtype and strides: the training formula with ``coef`` from ``backward_sums``,
    the eval one (statistics held constant) when ``coef`` is None."""
    dx = torch.empty_like(x)
    launch_dx(
        key, geo.grid, (dy, x, dx, coef, *norm.args(x.shape[1]), *geo.args()),
        lambda: {"TRAINING": coef is not None, **norm.meta(), **geo.meta()},
    )
    return dx
