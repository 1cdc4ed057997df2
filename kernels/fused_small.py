"""The fused-small plan: when a channel's whole slab fits one program's registers, one launch does
the training forward (exact two-pass mean and variance, normalize + affine + activation, running
statistics) and one launch the backward (dz = dy·act'(z) with z recomputed, Σdz, Σdz·x̂, dγ, dβ
and dx), each reading its inputs once. An optional residual r is added before the activation,
y = act(z + r), and its gradient dr = dy·act'(z + r) is written by the backward; the
memory-efficient backward reads the output y instead of x (``FROM_OUTPUT``) and recovers
x − mean = (act⁻¹(y) − β)/(invstd·γ).
"""

import torch
import triton
import triton.language as tl

from .activation import activate, activation_grad, activation_inverse
from .launch import Launcher
from .normalization import Normalization
from .plans import Geometry
from .tiling import (
    as_row,
    channel_affine,
    load_channel,
    merge_lanes,
    store_channel,
    tile_offsets,
    tile_pointers,
    tile_welford,
)


@triton.jit
def fused_forward_kernel(
    x_ptr,
    y_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    running_mean_ptr,
    running_var_ptr,
    save_ptr,
    counter_ptr,
    C,
    momentum,
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
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_COUNTER: tl.constexpr,
):
    # mean = Σx/n, var = Σ(x − mean)²/n over the slab in registers,
    # y = act((x − mean)·invstd·γ + β [+ r]), save[2, C] = (mean, invstd); running statistics
    # updated last with the unbiased variance. With HAS_COUNTER program 0 counts the batch.
    pid_k = tl.program_id(0)
    if HAS_COUNTER:  # noqa: SIM102 (a constexpr test, pruned at compile time)
        if pid_k == 0:
            tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    offsets, mask = tile_offsets(
        pid_k, 0, R, K, KB, stride_r, stride_k, stride_c, BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64, ALIGN
    )
    # The column tiling's per-channel statistics and coefficients are [BLOCK_K] vectors of the
    # tile's layout: a 16-bit slab takes fp32's (tiling.tile_pointers). Channel-major, they are
    # scalars, and the hint saves no registers (the backward takes more with it).
    NARROW: tl.constexpr = not CHANNEL_MAJOR
    x = tl.load(tile_pointers(x_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0).to(tl.float32)
    count, mean, m2 = tile_welford(x, mask)
    if CHANNEL_MAJOR:
        count, mean, m2 = merge_lanes(count, mean, m2)
    var = m2 / tl.maximum(count, 1.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    a = invstd
    if HAS_WEIGHT:
        a = a * load_channel(weight_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    y = (x - as_row(mean, CHANNEL_MAJOR)) * as_row(a, CHANNEL_MAJOR)
    if HAS_BIAS:
        y = y + as_row(load_channel(bias_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
    if HAS_RESIDUAL:
        residual = tl.load(tile_pointers(residual_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0)
        y = y + residual.to(tl.float32)
    y = activate(y, ACTIVATION, slope)
    tl.store(tile_pointers(y_ptr, offsets, ALIGN, NARROW), y.to(y_ptr.dtype.element_ty), mask=mask)
    store_channel(save_ptr, mean, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(save_ptr + C, invstd, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    if HAS_RUNNING:
        running_mean = load_channel(running_mean_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        running_var = load_channel(running_var_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        unbiased = var * count / tl.maximum(count - 1.0, 1.0)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased
        store_channel(running_mean_ptr, running_mean, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        store_channel(running_var_ptr, running_var, pid_k, C, BLOCK_K, CHANNEL_MAJOR)


@triton.jit
def fused_backward_kernel(
    dy_ptr,
    x_ptr,
    residual_ptr,
    dx_ptr,
    dres_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    stats_ptr,
    var_ptr,
    weight_ptr,
    bias_ptr,
    C,
    eps,
    slope,
    count,
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
    NEEDS_INPUT: tl.constexpr,
    NEEDS_WEIGHT: tl.constexpr,
    NEEDS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NEEDS_RESIDUAL: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
):
    # dz = dy·act'(u) with u = (x − mean)·a + b [+ r] recomputed (a = invstd·γ, b = β); dβ = Σdz,
    # dγ = Σdz·(x − mean)·invstd, dx = a·(dz − Σdz/n − (x − mean)·invstd²·Σdz·(x − mean)/n),
    # dr = dz; all from one read. FROM_OUTPUT: x_ptr holds y = act(z) (no residual), so
    # z = act⁻¹(y) and x − mean = (z − b)/a.
    pid_k = tl.program_id(0)
    offsets, mask = tile_offsets(
        pid_k, 0, R, K, KB, stride_r, stride_k, stride_c, BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64, ALIGN
    )
    NARROW: tl.constexpr = not CHANNEL_MAJOR  # as in the forward
    mean, invstd, a, b = channel_affine(
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
    dy = tl.load(tile_pointers(dy_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0).to(tl.float32)
    x = tl.load(tile_pointers(x_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0).to(tl.float32)
    if FROM_OUTPUT:
        z = activation_inverse(x, ACTIVATION, slope)
        a_safe = tl.where(a == 0.0, 1.0, a)  # padded channels of a column tile have a = 0
        xmu = tl.where(mask, (z - as_row(b, CHANNEL_MAJOR)) / as_row(a_safe, CHANNEL_MAJOR), 0.0)
    else:
        xmu = tl.where(mask, x - as_row(mean, CHANNEL_MAJOR), 0.0)
        z = xmu * as_row(a, CHANNEL_MAJOR) + as_row(b, CHANNEL_MAJOR)
    if HAS_RESIDUAL:
        residual = tl.load(tile_pointers(residual_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0)
        z = z + residual.to(tl.float32)
    dz = activation_grad(dy, z, ACTIVATION, slope)
    if NEEDS_RESIDUAL:
        tl.store(tile_pointers(dres_ptr, offsets, ALIGN, NARROW), dz.to(dres_ptr.dtype.element_ty), mask=mask)
    sum_dz = tl.sum(dz, axis=0)
    sum_dz_xmu = tl.sum(dz * xmu, axis=0)
    if CHANNEL_MAJOR:
        sum_dz = tl.sum(sum_dz, axis=0)
        sum_dz_xmu = tl.sum(sum_dz_xmu, axis=0)
    if NEEDS_WEIGHT:
        store_channel(grad_weight_ptr, sum_dz_xmu * invstd, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    if NEEDS_BIAS:
        store_channel(grad_bias_ptr, sum_dz, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    if NEEDS_INPUT:
        # Σ dz·(x − mean)·invstd² / n, in an order whose every step stays near the result's size:
        # invstd² alone overflows fp32 once var + eps is below ~3e-39.
        k_xmu = sum_dz_xmu * invstd / count * invstd
        dx = as_row(a, CHANNEL_MAJOR) * (
            dz - as_row(sum_dz / count, CHANNEL_MAJOR) - xmu * as_row(k_xmu, CHANNEL_MAJOR)
        )
        tl.store(tile_pointers(dx_ptr, offsets, ALIGN, NARROW), dx.to(dx_ptr.dtype.element_ty), mask=mask)


launch_forward = Launcher(fused_forward_kernel)
launch_backward = Launcher(fused_backward_kernel)


def fused_forward(
    x: torch.Tensor,
    geo: Geometry,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    *,
    activation: int = 0,
    slope: float = 0.0,
    key: object,
    residual: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: returns (y in x's dtype and strides, save[2, C] fp32 = (mean, invstd)).
    ``residual`` (x's shape and strides) is added before the activation; ``counter`` (a
    module's int64 num_batches_tracked), when given, gets 1 added. ``key`` names the launch
    site."""
    channels = x.shape[1]
    y = torch.empty_like(x)
    save = x.new_empty((2, channels), dtype=torch.float32)
    launch_forward(
        key,
        geo.grid,
        (
            x,
            y,
            residual,
            weight,
            bias,
            running_mean,
            running_var,
            save,
            counter,
            channels,
            float(momentum),
            float(eps),
            float(slope),
            *geo.args(),
        ),
        lambda: {
            "HAS_WEIGHT": weight is not None,
            "HAS_BIAS": bias is not None,
            "HAS_RUNNING": running_mean is not None,
            "ACTIVATION": activation,
            "HAS_RESIDUAL": residual is not None,
            "HAS_COUNTER": counter is not None,
            **geo.meta(),
        },
    )
    return y, save


def fused_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    geo: Geometry,
    norm: Normalization,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    *,
    key: object,
    residual: torch.Tensor | None = None,
    need_residual: bool = False,
    from_output: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One launch: (dx, dγ, dβ, d residual), each None unless asked for. ``x`` is the forward's
    input, or its output y when ``from_output``; ``residual`` is the forward's (needed with an
    activation). ``key`` names the launch site."""
    channels = x.shape[1]
    dx = torch.empty_like(x) if need_input else None
    dres = torch.empty_like(x) if need_residual else None
    grad_weight, grad_bias = norm.parameter_grads(x, need_weight, need_bias)
    launch_backward(
        key,
        geo.grid,
        (
            dy,
            x,
            residual,
            dx,
            dres,
            grad_weight,
            grad_bias,
            *norm.args(channels),
            float(x.numel() // channels),
            *geo.args(),
        ),
        lambda: {
            "NEEDS_INPUT": need_input,
            "NEEDS_WEIGHT": need_weight,
            "NEEDS_BIAS": need_bias,
            "HAS_RESIDUAL": residual is not None,
            "NEEDS_RESIDUAL": need_residual,
            "FROM_OUTPUT": from_output,
            **norm.meta(),
            **geo.meta(),
        },
    )
    return dx, grad_weight, grad_bias, dres
