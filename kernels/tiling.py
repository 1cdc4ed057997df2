"""Triton helpers shared by every kernel: tile addressing, per-channel loads and stores (and the
per-channel affine coefficients), and the Welford/Chan merges of (count, mean, M2) statistics.
See ``plans.py`` for the two tilings and the alignment (ALIGN) that ``tile_offsets`` shows the
compiler.
"""

import triton
import triton.language as tl

from . import normalization

# The largest finite fp32: |mean| above it is ±inf (or NaN).
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def tile_offsets(
    pid_k,
    block,
    R,
    K,
    KB,
    stride_r,
    stride_k,
    stride_c,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHANNEL_MAJOR: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Tile `block` of program group `pid_k`: element (r, k) sits at r·stride_r + k·stride_k
    # (+ pid_k·stride_c for the channel-major tiling, whose tiles run over (row block, key block)).
    if ALIGN > 1 and ALIGN < 16:
        # K, stride_r and stride_c are multiples of ALIGN (plans.Geometry.align): written as
        # (v // ALIGN)·ALIGN, the same values, they show the compiler that each run of ALIGN
        # elements along k starts aligned and lies wholly in or out of the mask, so that it
        # loads and stores whole vectors. (tl.multiple_of on a function argument is silently
        # dropped by Triton 3.6 and 3.8; at 16 Triton's own specialization says it.)
        K = K // ALIGN * ALIGN
        stride_r = stride_r // ALIGN * ALIGN
        if CHANNEL_MAJOR:
            stride_c = stride_c // ALIGN * ALIGN
    if INT64:
        block = tl.cast(block, tl.int64)
    if CHANNEL_MAJOR:
        rb = block // KB
        kb = block - rb * KB
    else:
        rb = block
        kb = pid_k
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < R)[:, None] & (k < K)[None, :]
    if INT64:
        r = r.to(tl.int64)
        k = k.to(tl.int64)
    offsets = r[:, None] * stride_r + k[None, :] * stride_k
    if CHANNEL_MAJOR:
        if INT64:
            offsets += pid_k.to(tl.int64) * stride_c
        else:
            offsets += pid_k * stride_c
    return offsets, mask


@triton.jit
def tile_pointers(ptr, offsets, ALIGN: tl.constexpr, NARROW: tl.constexpr):
    # ptr + offsets for a tile from ``tile_offsets``. With NARROW, a 16-bit tile whose rows run
    # in aligned runs of 8 or more (ALIGN > 4) is read 4 elements (8 bytes) a thread at a time,
    # as an fp32 tile is. Triton lays a tile out by its widest vector, 8 16-bit elements a thread
    # against 4 fp32, and each [BLOCK_K] vector of column statistics reduced from the tile (a
    # slice of that layout) then holds 8 values a thread where fp32's holds 4: without the hint
    # the split statistics kernel, whose three such vectors live across its loop, takes 111
    # registers a thread in bfloat16 against 64 in fp32 (sm_90, Triton 3.8). The hint, a
    # contiguity of 4 along k (true: ALIGN > 1 only where stride_k = 1), gives the tile fp32's
    # layout, so that after the cast to fp32 the registers, the reductions and their order are
    # fp32's. (On the pointers: a hint on the offsets is lost when their adds are folded.)
    ptrs = ptr + offsets
    if NARROW and ALIGN > 4 and ptr.dtype.element_ty.primitive_bitwidth < 32 and offsets.shape[1] > 4:
        ptrs = tl.max_contiguous(ptrs, [1, 4])
    return ptrs


@triton.jit
def load_channel(ptr, pid_k, K, BLOCK_K: tl.constexpr, CHANNEL_MAJOR: tl.constexpr):
    # The fp32 per-channel value(s) of this program: a scalar (channel-major) or [BLOCK_K].
    # (One return after a static if/else: the compiler type-checks every return it meets.)
    if CHANNEL_MAJOR:
        value = tl.load(ptr + pid_k).to(tl.float32)
    else:
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        value = tl.load(ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return value


@triton.jit
def store_channel(ptr, value, pid_k, K, BLOCK_K: tl.constexpr, CHANNEL_MAJOR: tl.constexpr):
    # Store this program's per-channel value(s), cast to the pointer's element type.
    if CHANNEL_MAJOR:
        tl.store(ptr + pid_k, value.to(ptr.dtype.element_ty))
    else:
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(ptr + k, value.to(ptr.dtype.element_ty), mask=k < K)


# Where a kernel finds a channel's statistics (the STATS constexpr, see normalization.py):
# RUNNING — stats_ptr holds the running mean and var_ptr the running variance (eval);
# SAVED — stats_ptr holds the training forward's save: mean in row 0, invstd in row 1;
# FOLDED — the split forward's save: mean, invstd, scale = invstd·γ and shift = β in rows 0..3.
RUNNING: tl.constexpr = tl.constexpr(normalization.RUNNING)
FOLDED: tl.constexpr = tl.constexpr(normalization.FOLDED)


@triton.jit
def channel_affine(
    stats_ptr,
    var_ptr,
    weight_ptr,
    bias_ptr,
    eps,
    pid_k,
    K,
    BLOCK_K: tl.constexpr,
    CHANNEL_MAJOR: tl.constexpr,
    STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # This program's per-channel mean, invstd (rsqrt(var + eps) from running statistics),
    # a = invstd·γ and b = β (0 without bias): the normalized, affine value is z = (x − mean)·a + b.
    mean = load_channel(stats_ptr, pid_k, K, BLOCK_K, CHANNEL_MAJOR)
    if STATS == RUNNING:
        invstd = 1.0 / tl.sqrt(load_channel(var_ptr, pid_k, K, BLOCK_K, CHANNEL_MAJOR) + eps)
    else:
        invstd = load_channel(stats_ptr + K, pid_k, K, BLOCK_K, CHANNEL_MAJOR)
    if STATS == FOLDED:
        a = load_channel(stats_ptr + 2 * K, pid_k, K, BLOCK_K, CHANNEL_MAJOR)
        b = load_channel(stats_ptr + 3 * K, pid_k, K, BLOCK_K, CHANNEL_MAJOR)
    else:
        a = invstd
        if HAS_WEIGHT:
            a = a * load_channel(weight_ptr, pid_k, K, BLOCK_K, CHANNEL_MAJOR)
        b = tl.zeros_like(a)
        if HAS_BIAS:
            b = load_channel(bias_ptr, pid_k, K, BLOCK_K, CHANNEL_MAJOR)
    return mean, invstd, a, b


@triton.jit
def affine_rows(
    stats_ptr,
    var_ptr,
    weight_ptr,
    bias_ptr,
    eps,
    pid_k,
    K,
    BLOCK_K: tl.constexpr,
    CHANNEL_MAJOR: tl.constexpr,
    STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # mean, a and b of ``channel_affine``, broadcast against this program's tiles.
    mean, _, a, b = channel_affine(
        stats_ptr,
        var_ptr,
        weight_ptr,
        bias_ptr,
        eps,
        pid_k,
        K,
        BLOCK_K,
        CHANNEL_MAJOR,
        STATS,
        HAS_WEIGHT,
        HAS_BIAS,
    )
    return as_row(mean, CHANNEL_MAJOR), as_row(a, CHANNEL_MAJOR), as_row(b, CHANNEL_MAJOR)


@triton.jit
def as_row(value, CHANNEL_MAJOR: tl.constexpr):
    # Broadcast per-channel value(s) against a [BLOCK_R, BLOCK_K] tile.
    return value if CHANNEL_MAJOR else value[None, :]


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    # Chan et al.: n = na + nb, δ = mb − ma, mean = ma + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n.
    # An empty side (count 0) leaves the other unchanged.
    count = count_a + count_b
    frac = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac
    # Grouped so that the empty side's δ (the other side's mean, up to 3.4e38) meets na·nb/n = 0
    # before it is squared: δ²·0 would be inf·0 = NaN for a mean over ~1.8e19.
    m2 = m2_a + m2_b + delta * (delta * (count_a * frac))
    return count, mean, m2


@triton.jit
def tile_welford(x, mask):
    # Column statistics of a tile, the corrected two-pass algorithm in registers: with m = Σx/n
    # (rounded) and r = Σ(x − m), the mean is m + r/n and M2 = Σ(x − m)² − r²/n. r is the rounding
    # error of m: it is what keeps a channel whose mean is large next to its spread (1e4 ± 1 in
    # fp32) from losing its variance, and makes a constant channel's M2 exactly 0.
    count = tl.sum(mask.to(tl.float32), axis=0)
    n = tl.maximum(count, 1.0)
    first = tl.sum(x, axis=0) / n
    centered = tl.where(mask, x - first[None, :], 0.0)
    residual = tl.sum(centered, axis=0)
    m2 = tl.sum(centered * centered, axis=0) - residual * (residual / n)
    # M2 ≥ 0 in exact arithmetic; a select rather than tl.maximum, which would turn NaN into 0.
    m2 = tl.where(m2 < 0.0, 0.0, m2)
    # An infinite first mean stays as it is (r is inf − inf = NaN there): torch's is ±inf too.
    return count, tl.where(tl.abs(first) <= FLOAT32_MAX, first + residual / n, first), m2


@triton.jit
def merge_lanes(count, mean, m2):
    # Merge the per-column statistics of a program into one: the parallel form of Chan's formula,
    # mean = Σ nᵢ·meanᵢ / n and M2 = Σ (M2ᵢ + nᵢ·(meanᵢ − mean)²).
    # The weighted mean gets the same correction as a tile's: Σ nᵢ·(meanᵢ − mean) / n, the error
    # of the first estimate.
    total = tl.sum(count, axis=0)
    n = tl.maximum(total, 1.0)
    merged_mean = tl.sum(count * mean, axis=0) / n
    correction = tl.sum(count * (mean - merged_mean), axis=0) / n
    merged_mean = tl.where(tl.abs(merged_mean) <= FLOAT32_MAX, merged_mean + correction, merged_mean)
    delta = mean - merged_mean
    merged_m2 = tl.sum(m2 + count * delta * delta, axis=0)
    return total, merged_mean, merged_m2
