"""Backward of the split plans and of eval mode. With z = (x − mean)·invstd·γ + β recomputed from
the saved input, y = act(z) and dz = dy·act'(z) (dz = dy without an activation), over the n
elements of a channel:

    dβ = Σ dz,    dγ = Σ dz·x̂,    dx = γ·invstd·(dz − Σdz/n − (x − mean)·invstd²·Σ dz·(x − mean)/n)

in training; in eval the running statistics are constants and dx = γ·invstd·dz. Two launches:
fp32 partial sums per program, merged in split order by the last program of each channel group
(dγ, dβ and the dx coefficients; see ``workspace.py``), then the elementwise dx. No float
atomics: deterministic.

With a residual r the forward computed y = act(z + r): the kernels recompute u = z + r, use
dz = dy·act'(u), and the dx kernel writes the residual's gradient dr = dz. The memory-efficient
backward (``FROM_OUTPUT``) reads the output y = act(z) in place of x and recovers
z = act⁻¹(y) and x − mean = (z − β)/(invstd·γ) (γ is kept away from 0 by the caller).
"""

import torch
import triton
import triton.language as tl

from .activation import NONE, activation_grad, activation_inverse
from .launch import Launcher
from .normalization import Normalization
from .occupancy import fitted
from .plans import Geometry
from .tiling import (
    affine_rows,
    as_row,
    channel_affine,
    load_channel,
    store_channel,
    tile_offsets,
    tile_pointers,
)
from .workspace import split_workspace


@triton.jit
def _recompute(
    x_ptr,
    residual_ptr,
    offsets,
    mask,
    mean,
    a,
    b,
    slope,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    ALIGN: tl.constexpr,
    NARROW: tl.constexpr,
):
    # (x − mean, u): from the saved input, x − mean and u = (x − mean)·a + b [+ r]; from the
    # saved output (FROM_OUTPUT), z = act⁻¹(y), x − mean = (z − b)/a and u = z. Masked lanes
    # give x − mean = 0. NARROW (tiling.tile_pointers): the sums kernel, whose [BLOCK_K]
    # accumulators live across its loop, reads 16-bit tiles in fp32's layout; the elementwise
    # dx kernel keeps its 16-byte vectors.
    x = tl.load(tile_pointers(x_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0).to(tl.float32)
    if FROM_OUTPUT:
        u = activation_inverse(x, ACTIVATION, slope)
        # Padded channels of a column tile have a = 0: divide by 1 there (their lanes are masked).
        xmu = tl.where(mask, (u - b) / tl.where(a == 0.0, 1.0, a), 0.0)
    else:
        xmu = tl.where(mask, x - mean, 0.0)
        u = xmu * a + b
    if HAS_RESIDUAL:
        residual = tl.load(tile_pointers(residual_ptr, offsets, ALIGN, NARROW), mask=mask, other=0.0)
        u = u + residual.to(tl.float32)
    return xmu, u


@triton.jit
def backward_sums_kernel(
    dy_ptr,
    x_ptr,
    residual_ptr,
    partial_ptr,
    ticket_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    coef_ptr,
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
    SPLIT,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHANNEL_MAJOR: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,
    STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NEEDS_WEIGHT: tl.constexpr,
    NEEDS_BIAS: tl.constexpr,
    NEEDS_COEF: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
):
    # Program (g, s): fp32 Σ dz and Σ dz·(x − mean) over its tiles, with dz = dy·act'(z) and
    # z = (x − mean)·a + b (a = invstd·γ, b = β), into row s of partials[2, SPLIT, C]. The last
    # program of group g sums rows 0..SPLIT-1 in order: dβ = Σdz, dγ = Σdz·(x − mean)·invstd and
    # the dx coefficients coef[2, C] = (Σdz/n, invstd²·Σdz·(x − mean)/n). With a residual,
    # dz = dy·act'(z + r); FROM_OUTPUT recovers x − mean from y (see ``_recompute``).
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
    acc_dz = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_dz_xmu = tl.zeros([BLOCK_K], dtype=tl.float32)
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
        dy = tl.load(tile_pointers(dy_ptr, offsets, ALIGN, True), mask=mask, other=0.0).to(tl.float32)
        xmu, u = _recompute(
            x_ptr,
            residual_ptr,
            offsets,
            mask,
            mean,
            a,
            b,
            slope,
            ACTIVATION,
            HAS_RESIDUAL,
            FROM_OUTPUT,
            ALIGN,
            True,
        )
        dz = activation_grad(dy, u, ACTIVATION, slope)
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
            sum_dz_xmu += load_channel(partial_ptr + plane + s * C, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        _, invstd, _, _ = channel_affine(
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
        if NEEDS_WEIGHT:
            store_channel(grad_weight_ptr, sum_dz_xmu * invstd, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        if NEEDS_BIAS:
            store_channel(grad_bias_ptr, sum_dz, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        if NEEDS_COEF:
            store_channel(coef_ptr, sum_dz / count, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
            # Σ dz·(x − mean)·invstd²/n, ordered as in fused_small.py so that no step overflows.
            store_channel(
                coef_ptr + C, sum_dz_xmu * invstd / count * invstd, pid_k, C, BLOCK_K, CHANNEL_MAJOR
            )
        tl.store(ticket_ptr + pid_k, 0)


@triton.jit
def backward_dx_kernel(
    dy_ptr,
    x_ptr,
    residual_ptr,
    dx_ptr,
    dres_ptr,
    coef_ptr,
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
    TRAINING: tl.constexpr,
    NEEDS_INPUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NEEDS_RESIDUAL: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
):
    # Training: dx = a·(dz − mean_dz − (x − mean)·k_xmu) with the combine's coefficients;
    # eval: dx = a·dz. a = invstd·γ and dz = dy·act'(u), u = z [+ r]; the residual's gradient is
    # dr = dz. Eval without activation never reads x.
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
    if TRAINING:
        mean_dz = as_row(load_channel(coef_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
        k_xmu = as_row(load_channel(coef_ptr + C, pid_k, C, BLOCK_K, CHANNEL_MAJOR), CHANNEL_MAJOR)
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
        dz = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if TRAINING or ACTIVATION != NONE:
            xmu, u = _recompute(
                x_ptr,
                residual_ptr,
                offsets,
                mask,
                mean,
                a,
                b,
                slope,
                ACTIVATION,
                HAS_RESIDUAL,
                FROM_OUTPUT,
                ALIGN,
                False,
            )
            dz = activation_grad(dz, u, ACTIVATION, slope)
            if NEEDS_RESIDUAL:
                tl.store(dres_ptr + offsets, dz.to(dres_ptr.dtype.element_ty), mask=mask)
            if TRAINING:
                dz = dz - mean_dz - xmu * k_xmu
        elif NEEDS_RESIDUAL:
            tl.store(dres_ptr + offsets, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        if NEEDS_INPUT:
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
    residual: torch.Tensor | None = None,
    from_output: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One launch: (grad_weight, grad_bias, coef[2, C]), each None unless asked for. ``x`` is the
    forward's input, or its output when ``from_output``; ``residual`` the forward's. ``key``
    names the launch site."""
    channels = x.shape[1]
    count = float(x.numel() // channels)
    grad_weight, grad_bias = norm.parameter_grads(x, need_weight, need_bias)
    coef = torch.empty((2, channels), device=x.device, dtype=torch.float32) if need_coef else None

    def args(geo: Geometry) -> tuple[object, ...]:
        return (
            dy,
            x,
            residual,
            *split_workspace(x.device, 2 * geo.split * channels, geo.groups),  # [2, SPLIT, C], [groups]
            grad_weight,
            grad_bias,
            coef,
            *norm.args(channels),
            count,
            *geo.args(),
            geo.split,
        )

    def meta() -> dict[str, object]:
        return {
            "NEEDS_WEIGHT": need_weight,
            "NEEDS_BIAS": need_bias,
            "NEEDS_COEF": need_coef,
            "HAS_RESIDUAL": residual is not None,
            "FROM_OUTPUT": from_output,
            **norm.meta(),
            **geo.meta(),
        }

    geo = fitted(launch_sums, key, geo, x.device, args, meta)
    launch_sums(key, geo.grid, args(geo), meta)
    return grad_weight, grad_bias, coef


def backward_dx(
    dy: torch.Tensor,
    x: torch.Tensor,
    geo: Geometry,
    norm: Normalization,
    coef: torch.Tensor | None,
    *,
    key: object,
    residual: torch.Tensor | None = None,
    need_input: bool = True,
    need_residual: bool = False,
    from_output: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, d residual) in ``x``'s dtype and strides, each None unless asked for: dx by the
    training formula with ``coef`` from ``backward_sums``, the eval one (statistics held
    constant) when ``coef`` is None (pass None too when only the residual's gradient is asked
    for). ``x`` is the forward's input, or its output when ``from_output``."""
    dx = torch.empty_like(x) if need_input else None
    dres = torch.empty_like(x) if need_residual else None

    def args(geo: Geometry) -> tuple[object, ...]:
        return (dy, x, residual, dx, dres, coef, *norm.args(x.shape[1]), *geo.args())

    def meta() -> dict[str, object]:
        return {
            "TRAINING": coef is not None,
            "NEEDS_INPUT": need_input,
            "HAS_RESIDUAL": residual is not None,
            "NEEDS_RESIDUAL": need_residual,
            "FROM_OUTPUT": from_output,
            **norm.meta(),
            **geo.meta(),
        }

    geo = fitted(launch_dx, key, geo, x.device, args, meta)
    launch_dx(key, geo.grid, args(geo), meta)
    return dx, dres
