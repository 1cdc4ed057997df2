"""The CPU fallback against torch.nn, timed in pairs.

On a CPU tritonbn's modules run PyTorch's own batch_norm behind the dispatcher, so what they add
is host time: the checks, the dispatcher's decision, a Python frame. On a shared machine two
timings taken seconds apart differ by more than that (test_bench_batchnorm's CPU figures of one
case move by tens of percent from run to run), so here tritonbn's forward+backward and torch.nn's
are timed in alternating blocks, and each adjacent pair gives a ratio: a disturbance that lasts
longer than a block slows both sides of the pair alike. The median ratio is what the CPU
fallback's target is judged on. CPU only: on a GPU the two run different kernels, which
test_bench_batchnorm compares.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from cases import SHAPES
from measure import keep_runs, quartiles
from torch import nn

import tritonbn

LENET_SHAPES = dict(SHAPES)["lenet"]
# Pairs of blocks, and the time a block aims at: short enough that the machine's state rarely
# changes within a pair, long enough to average over calls. On LeNet's first layer a call's time
# varies by several percent (its 3.5 MB tensors come from mmap and fault their pages in afresh:
# with glibc's mmap threshold raised, the spread narrowed): there 20 ms blocks (8 calls) left the
# median of 31 pairs anywhere from -7% to +10% over eight runs.
PAIRS = 31
BLOCK_SECONDS = 0.1


def _seconds_per_call(step: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def paired_times(
    ours: Callable[[], object], theirs: Callable[[], object], pairs: int = PAIRS
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``ours`` and of ``theirs``, block by block, in ``pairs`` adjacent
    pairs; which side goes first alternates, so that neither always runs on a warmer machine."""
    calls = max(1, round(BLOCK_SECONDS / _seconds_per_call(theirs, 3)))
    for step in (ours, theirs):  # warm-up, untimed
        _seconds_per_call(step, calls)
    ours_s, theirs_s = [], []
    for index in range(pairs):
        first, second = (ours, theirs) if index % 2 == 0 else (theirs, ours)
        times = {id(first): _seconds_per_call(first, calls), id(second): _seconds_per_call(second, calls)}
        ours_s.append(times[id(ours)])
        theirs_s.append(times[id(theirs)])
    return ours_s, theirs_s


def forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], tuple]:
    inputs = (x, *module.parameters())
    return lambda: torch.autograd.grad(module(x), inputs, dy)


@pytest.mark.parametrize("shape", LENET_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_cpu_fallback_against_torch(benchmark, device: torch.device, shape: tuple[int, ...]) -> None:
    if device.type == "cuda":
        pytest.skip("on CUDA tritonbn runs its own kernels: test_bench_batchnorm compares them with torch")
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn_like(x)
    dims = len(shape)
    ours = (tritonbn.BatchNorm2d if dims == 4 else tritonbn.BatchNorm1d)(shape[1])
    theirs = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(shape[1])
    step_ours, step_theirs = forward_backward(ours, x, dy), forward_backward(theirs, x, dy)
    # Before timing: the same kernel underneath gives the same gradients, bit for bit.
    for mine, torchs in zip(step_ours(), step_theirs(), strict=True):
        assert torch.equal(mine, torchs)

    benchmark.group = f"cpu fallback {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(
        {
            "suite": "fallback",
            "pass": "forward+backward",
            "shape": list(shape),
            "dtype": "float32",
            "layout": "contiguous",
        }
    )
    if benchmark.disabled:
        benchmark(step_ours)
        return
    ours_s, theirs_s = benchmark.pedantic(paired_times, args=(step_ours, step_theirs), rounds=1, iterations=1)
    keep_runs(benchmark, ours_s)
    median, q1, q3 = quartiles([a / b for a, b in zip(ours_s, theirs_s, strict=True)])
    benchmark.extra_info.update(
        {
            "pairs": len(ours_s),
            "ratio": median,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "ms": quartiles([s * 1e3 for s in ours_s])[0],
            "torch_ms": quartiles([s * 1e3 for s in theirs_s])[0],
        }
    )
