"""How the benchmarks time a call and what its time means in bytes per second.

One harness per device, and its runs are the figures of record:

- CUDA: device events through ``triton.testing.do_bench`` (the L2 cache flushed before every run,
  every run's time kept), never a host clock around asynchronous launches;
- CPU, where calls are synchronous: ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up,
  blocks of calls sized to the clock's resolution, torch's thread count fixed), each block's mean
  time per call one run, at least ``CPU_MIN_RUNS`` runs.

pytest-benchmark only carries the results: :func:`time_step` runs the harness once inside
``benchmark.pedantic(rounds=1)`` and then gives the fixture the harness's per-run times as its
statistics, so its table and the JSON's ``stats`` describe the same runs as ``extra_info["ms"]``
(the median), not the host time of one harness call.

Bandwidth: the bytes a pass-optimal kernel must move, divided by the measured time, also as a
percentage of the device's copy bandwidth measured the same way in the same session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# How each device is timed, as recorded in the results.
TIMER = {
    "cuda": "CUDA events: triton.testing.do_bench runs, L2 flushed before each run",
    "cpu": "torch.utils.benchmark.Timer.blocked_autorange: mean time per call of each block",
}
# Timed milliseconds of do_bench: warm-up, then repetitions (each run's time is recorded apart).
WARMUP_MS = 10
REPEAT_MS = 40
# On the CPU: seconds of blocked_autorange (after its own warm-up), and at least this many runs.
CPU_MIN_SECONDS = 0.2
CPU_MIN_RUNS = 5
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


def run_times_ms(fn: Callable[[], object], device: torch.device) -> list[float]:
    """The time of each run of ``fn`` on ``device``, in milliseconds, by the device's harness."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REPEAT_MS, return_mode="all"))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    seconds = list(timer.blocked_autorange(min_run_time=CPU_MIN_SECONDS).times)
    while len(seconds) < CPU_MIN_RUNS:  # a slow call: blocks of one call each
        seconds.append(timer.timeit(number=1).times[0])
    return [value * 1e3 for value in seconds]


def quartiles(times_ms: list[float]) -> list[float]:
    """Median, first and third quartile of ``times_ms`` (linear interpolation, like do_bench's)."""
    values = torch.tensor(times_ms, dtype=torch.float64)
    return torch.quantile(values, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)).tolist()


def quartiles_ms(fn: Callable[[], object], device: torch.device) -> list[float]:
    """Median, first and third quartile (ms) of one call of ``fn`` on ``device``."""
    return quartiles(run_times_ms(fn, device))


def time_step(benchmark: Any, step: Callable[[], object], device: torch.device) -> list[float] | None:
    """Time ``step`` with the device's harness under the pytest-benchmark fixture ``benchmark``:
    its (median, q1, q3) in ms, or None when benchmarking is disabled (``--benchmark-disable``:
    ``step`` then runs once). The fixture's statistics become the harness's runs."""
    if benchmark.disabled:
        benchmark(step)
        return None
    times = benchmark.pedantic(run_times_ms, args=(step, device), rounds=1, iterations=1)
    keep_runs(benchmark, [ms / 1e3 for ms in times])
    return quartiles(times)


def keep_runs(benchmark: Any, seconds: list[float]) -> None:
    """Make ``seconds`` (one call's time, run by run) the statistics pytest-benchmark reports for
    ``benchmark``, instead of the one round of the whole harness it timed."""
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for value in seconds:
        stats.update(value)
    benchmark.stats.stats = stats


# The wall-clock timing: the best of WALL_LOOPS loops of calls, each loop about WALL_LOOP_MS
# long (by the device time) and of WALL_MIN_CALLS to WALL_MAX_CALLS calls.
WALL_LOOPS = 5
WALL_LOOP_MS = 50
WALL_MIN_CALLS = 10
WALL_MAX_CALLS = 100
# Milliseconds do_bench_cudagraph replays its graph for, each of its ten times.
CUDAGRAPH_REP_MS = 20


def user_timings_ms(
    step: Callable[[], object], device: torch.device, device_ms: float, uncapturable: str | None = None
) -> dict[str, object]:
    """The times a user would recognize, besides the device time ``device_ms`` of ``time_step``
    (CUDA only): ``wall_ms``, the wall-clock time per call of a loop of calls without cache
    flushes, synchronized once (a small layer's host time shows here), and ``cudagraph_ms``, the
    time per call replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: no host time
    at all; None where the step cannot be captured, with the reason in ``cudagraph_error``).
    ``uncapturable`` says why ``step`` must not be captured at all: a failed capture can leave the
    process's CUDA state broken (the random generator refuses every later call), so what is known
    to fail is not tried."""
    if device.type != "cuda":
        return {}
    import time

    import triton.testing

    calls = max(WALL_MIN_CALLS, min(WALL_MAX_CALLS, int(WALL_LOOP_MS / max(device_ms, 1e-6))))
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(WALL_LOOPS):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    timings: dict[str, object] = {"wall_ms": best, "cudagraph_ms": None}
    if uncapturable is not None:
        timings["cudagraph_error"] = f"not captured: {uncapturable}"
        return timings
    try:
        timings["cudagraph_ms"] = float(triton.testing.do_bench_cudagraph(step, rep=CUDAGRAPH_REP_MS))
    except Exception as exc:  # a step that cannot be captured (host synchronization, say)
        timings["cudagraph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return timings


def triton_launches(step: Callable[[], object], device: torch.device) -> list[dict[str, object]] | None:
    """What one call of ``step`` launches on a GPU, kernel by kernel, in order: its name, grid,
    warps, registers a thread and spill bytes (as the driver reports them), shared memory, and
    the programs one SM holds at once (``kernels/occupancy.py``); None where no compiled Triton
    kernel launches (the interpreter, the CPU without the stand-in driver, whose kernels report no
    registers). Calls ``step`` once more, every launch through Triton's JIT
    (``tritonbn.tune.launches``)."""
    from tritonbn.kernels import occupancy, runtime

    if runtime.interpreted() or (device.type != "cuda" and not runtime.launches_cpu_tensors()):
        return None
    from tritonbn.tune import launches

    found: list[dict[str, object]] = []
    for compiled, grid in launches(step):
        registers = occupancy.kernel_registers(compiled)
        warps = int(compiled.metadata.num_warps)
        shared = int(compiled.metadata.shared)
        resident = None
        if registers:
            resident = occupancy.resident_programs(registers, warps, shared, occupancy.sm_limits(device))
        found.append(
            {
                "kernel": compiled.name,
                "grid": list(grid),
                "num_warps": warps,
                "registers": registers,
                "spill_bytes": int(getattr(compiled, "n_spills", 0) or 0),
                "shared": shared,
                "resident_per_sm": resident,
            }
        )
    return found


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
