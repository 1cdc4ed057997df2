"""Training-forward statistics of the split plans, in one launch: every program folds its tiles
into Welford partials, and the last program of each channel group to finish merges the group's
partials in split order (see ``workspace.py``) into mean, invstd, the folded scale/shift of the
normalize pass and the running-statistics update. No float atomics: the same input gives the
same bits.
"""

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .occupancy import fitted
from .plans import Geometry
from .tiling import (
    chan_merge,
    load_channel,
    merge_lanes,
    store_channel,
    tile_offsets,
    tile_pointers,
    tile_welford,
)
from .workspace import split_workspace


@triton.jit
def stats_kernel(
    x_ptr,
    partial_ptr,
    ticket_ptr,
    weight_ptr,
    bias_ptr,
    running_mean_ptr,
    running_var_ptr,
    save_ptr,
    counter_ptr,
    C,
    momentum,
    eps,
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
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    HAS_COUNTER: tl.constexpr,
):
    # Program (g, s) folds its range of tiles into fp32 (count, mean, M2) per channel (Chan's
    # merge of each tile's two-pass statistics) and stores them in row s of partials[3, SPLIT, C].
    # The last program of group g then merges rows 0..SPLIT-1 in order and computes
    #   var = M2/n, invstd = 1/sqrt(var + eps), scale = γ·invstd, shift = β  → save[4, C],
    #   running_mean ← (1−m)·running_mean + m·mean, running_var ← (1−m)·running_var + m·var·n/(n−1).
    # With HAS_COUNTER, program (0, 0) also counts the batch: num_batches_tracked += 1.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    if HAS_COUNTER:  # noqa: SIM102 (a constexpr test, pruned at compile time)
        if pid_k == 0 and split == 0:
            tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    count = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
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
        x = tl.load(tile_pointers(x_ptr, offsets, ALIGN, True), mask=mask, other=0.0).to(tl.float32)
        t_count, t_mean, t_m2 = tile_welford(x, mask)
        count, mean, m2 = chan_merge(count, mean, m2, t_count, t_mean, t_m2)
    if CHANNEL_MAJOR:
        count, mean, m2 = merge_lanes(count, mean, m2)
    plane = SPLIT * C
    store_channel(partial_ptr + split * C, count, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(partial_ptr + plane + split * C, mean, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    store_channel(partial_ptr + 2 * plane + split * C, m2, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
    # Every thread's stores happen before the release of the ticket.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + pid_k, 1, sem="acq_rel") == SPLIT - 1:
        count = load_channel(partial_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        mean = load_channel(partial_ptr + plane, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        m2 = load_channel(partial_ptr + 2 * plane, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        for s in range(1, SPLIT):
            row = s * C
            count, mean, m2 = chan_merge(
                count,
                mean,
                m2,
                load_channel(partial_ptr + row, pid_k, C, BLOCK_K, CHANNEL_MAJOR),
                load_channel(partial_ptr + plane + row, pid_k, C, BLOCK_K, CHANNEL_MAJOR),
                load_channel(partial_ptr + 2 * plane + row, pid_k, C, BLOCK_K, CHANNEL_MAJOR),
            )
        var = m2 / tl.maximum(count, 1.0)
        invstd = 1.0 / tl.sqrt(var + eps)
        scale = invstd
        if HAS_WEIGHT:
            scale = scale * load_channel(weight_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        shift = tl.zeros_like(scale)
        if HAS_BIAS:
            shift = load_channel(bias_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        store_channel(save_ptr, mean, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        store_channel(save_ptr + C, invstd, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        store_channel(save_ptr + 2 * C, scale, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        store_channel(save_ptr + 3 * C, shift, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        if HAS_RUNNING:
            running_mean = load_channel(running_mean_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
            running_var = load_channel(running_var_ptr, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
            unbiased = var * count / tl.maximum(count - 1.0, 1.0)
            running_mean = (1.0 - momentum) * running_mean + momentum * mean
            running_var = (1.0 - momentum) * running_var + momentum * unbiased
            store_channel(running_mean_ptr, running_mean, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
            store_channel(running_var_ptr, running_var, pid_k, C, BLOCK_K, CHANNEL_MAJOR)
        tl.store(ticket_ptr + pid_k, 0)


launch_stats = Launcher(stats_kernel)


def batch_statistics(
    x: torch.Tensor,
    geo: Geometry,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    *,
    key: object,
    counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """One launch; returns save[4, C] fp32 = (mean, invstd, scale, shift) and updates
    ``running_mean``/``running_var`` in place when given, and adds 1 to ``counter`` (a module's
    int64 num_batches_tracked) when given. ``key`` names the launch site."""
    channels = x.shape[1]
    save = torch.empty((4, channels), device=x.device, dtype=torch.float32)

    def args(geo: Geometry) -> tuple[object, ...]:
        return (
            x,
            *split_workspace(x.device, 3 * geo.split * channels, geo.groups),  # [3, SPLIT, C], [groups]
            weight,
            bias,
            running_mean,
            running_var,
            save,
            counter,
            channels,
            float(momentum),
            float(eps),
            *geo.args(),
            geo.split,
        )

    def meta() -> dict[str, object]:
        return {
            "HAS_WEIGHT": weight is not None,
            "HAS_BIAS": bias is not None,
            "HAS_RUNNING": running_mean is not None,
            "HAS_COUNTER": counter is not None,
            **geo.meta(),
        }

    geo = fitted(launch_stats, key, geo, x.device, args, meta)
    launch_stats(key, geo.grid, args(geo), meta)
    return save
