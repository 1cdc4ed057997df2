"""How the benchmarks time a call and what its time means in bytes per second.

Timing: on CUDA, device events through ``triton.testing.do_bench`` (the L2 cache flushed before
every run, quartiles of a few hundred runs); on the CPU, where calls are synchronous, the host
clock. Never a host clock around asynchronous CUDA launches.

Bandwidth: the bytes a pass-optimal kernel must move, divided by the measured time, also as a
percentage of the device's copy bandwidth measured the same way in the same session.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# How each device is timed, as recorded in the results.
TIMER = {
    "cuda": "CUDA events: triton.testing.do_bench quartiles, L2 flushed before each run",
    "cpu": "host clock: pytest-benchmark rounds",
}
# Timed milliseconds of do_bench: warm-up, then repetitions (each run's time is recorded apart).
WARMUP_MS = 10
REPEAT_MS = 40
QUANTILES = (0.5, 0.25, 0.75)
# Host-clock repetitions on the CPU: at least this many runs, and at least this many seconds.
CPU_MIN_RUNS = 5
CPU_MIN_SECONDS = 0.2
# Bytes copied to measure the copy bandwidth (one buffer; the copy reads it and writes another).
COPY_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}

# Traffic of a pass-optimal kernel, as (multiples of |x|, fp32 per-channel vectors moved):
# forward reads x for the statistics, reads it again to normalize and writes y (3|x|), and moves
# gamma, beta, the running mean/var (read and written) and the saved mean/invstd (8 vectors);
# backward reads dy and x for the sums, reads both again for dx and writes dx (5|x|), with gamma,
# the saved mean/invstd read and dgamma/dbeta written (5); eval reads x and writes y (2|x|) with
# 4 vectors read; forward+backward is their sum.
PASS_TRAFFIC: dict[str, tuple[int, int]] = {
    "forward": (3, 8),
    "backward": (5, 5),
    "eval": (2, 4),
    "forward+backward": (8, 13),
}
PARAM_BYTES = 4


def quartiles_ms(fn: Callable[[], object], device: torch.device) -> list[float]:
    """Median, first and third quartile (ms) of one call of ``fn`` on ``device``."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REPEAT_MS, quantiles=QUANTILES))
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < CPU_MIN_RUNS or time.perf_counter() - started < CPU_MIN_SECONDS:
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    q1, median, q3 = statistics.quantiles(times, n=4)
    return [median, q1, q3]


def time_step(benchmark: Any, step: Callable[[], object], device: torch.device) -> list[float] | None:
    """Time ``step`` under the pytest-benchmark fixture ``benchmark``: its (median, q1, q3) in ms,
    or None when benchmarking is disabled (``--benchmark-disable``: ``step`` then runs once).

    On CUDA the fixture times a single ``do_bench`` call, whose device-event quartiles are the
    figures of record; on the CPU pytest-benchmark's own rounds are.
    """
    if benchmark.disabled:
        benchmark(step)
        return None
    if device.type == "cuda":
        return benchmark.pedantic(quartiles_ms, args=(step, device), rounds=1, iterations=1)
    benchmark(step)
    stats = benchmark.stats.stats
    return [stats.median * 1e3, stats.q1 * 1e3, stats.q3 * 1e3]


def copy_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus bytes written), timed like the
    benchmarks."""
    source = torch.randn(COPY_BYTES[device.type] // 4, device=device)
    target = torch.empty_like(source)
    ms = quartiles_ms(lambda: target.copy_(source), device)[0]
    return 2 * source.numel() * source.element_size() / (ms * 1e6)


def pass_bytes(pass_name: str, numel: int, itemsize: int, channels: int) -> int:
    """Bytes a pass-optimal kernel moves for ``pass_name`` on ``numel`` elements of ``itemsize``
    bytes with ``channels`` channels (fp32 per-channel vectors)."""
    tensors, vectors = PASS_TRAFFIC[pass_name]
    return tensors * numel * itemsize + vectors * channels * PARAM_BYTES


def throughput(nbytes: int, ms: float, copy: float | None) -> dict[str, float | None]:
    """GB/s of moving ``nbytes`` in ``ms``, and its percentage of the copy bandwidth ``copy``."""
    gbps = nbytes / (ms * 1e6)
    return {"gbps": gbps, "pct_of_copy": None if copy is None else 100.0 * gbps / copy}
