"""The two fusions of issue 15 against what a network runs without them: time of forward+backward
and the peak memory of the step.

- residual: ``tritonbn.BatchNorm2d(activation="relu")(x, residual=z)`` — ResNet's block tail,
  relu(bn(x) + z), in one pass — against torch's BatchNorm2d, the add and ReLU, eager and under
  ``torch.compile``;
- memory-efficient: ``tritonbn.BatchNorm2d(activation="leaky_relu", memory_efficient=True)``
  (saves y, not x) against the same module saving x, and torch's BatchNorm2d + LeakyReLU, eager
  and compiled.

Each test first checks that its variant gives the reference's output and gradients, so with
``--benchmark-disable`` it is a test too. On a CPU only a small shape runs, once, as that check
(tritonbn runs its CPU fallback there; torch.compile and the memory figures are skipped); the
figures that matter come from a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cases import dtype_name
from measure import time_step
from torch import nn

import tritonbn

SHAPES = ((32, 64, 56, 56), (32, 256, 56, 56), (256, 16, 8, 8))
CPU_SHAPES = ((8, 16, 8, 8),)
RESIDUAL_VARIANTS = ("tritonbn", "torch", "torch.compile")
LEAN_VARIANTS = ("tritonbn-memory-efficient", "tritonbn", "torch", "torch.compile")
SLOPE = 0.01
# When this suite runs among the others (bench/cases.py's tiers): with the forced plans and the
# reference in float32, before torch.compile's tier.
TIER = 2


class TorchTail(nn.Module):
    """torch's unfused ResNet tail: relu(bn(x) + z)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x) + z)


class TritonTail(nn.Module):
    """tritonbn's fused tail: one BatchNorm with residual and relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = tritonbn.BatchNorm2d(channels, activation="relu")

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.bn(x, residual=z)


def build_tail(variant: str, channels: int, device: torch.device) -> nn.Module:
    module = (TritonTail if variant == "tritonbn" else TorchTail)(channels).to(device)
    return torch.compile(module) if variant == "torch.compile" else module


def build_lean(variant: str, channels: int, device: torch.device) -> nn.Module:
    if variant.startswith("tritonbn"):
        module = tritonbn.BatchNorm2d(
            channels,
            activation="leaky_relu",
            negative_slope=SLOPE,
            memory_efficient=variant.endswith("memory-efficient"),
        )
    else:
        module = nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE))
    module = module.to(device)
    return torch.compile(module) if variant == "torch.compile" else module


def peak_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """The step's peak CUDA memory above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def skip_unless_runs(device: torch.device, shape: tuple[int, ...], variant: str) -> None:
    if device.type != "cuda":
        if shape not in CPU_SHAPES:
            pytest.skip("no CUDA: only the small shape is checked on a CPU")
        if variant == "torch.compile":
            pytest.skip("no CUDA: torch.compile builds for tens of seconds on a CPU")
    elif shape in CPU_SHAPES:
        pytest.skip("the CPU check shape: too small to time on a GPU")


def record(benchmark, step, device, **info) -> None:
    info["peak_bytes"] = peak_bytes(step, device)
    times = time_step(benchmark, step, device)
    benchmark.extra_info.update(info)
    if times is not None:
        median, q1, q3 = times
        benchmark.extra_info.update(ms=median, ms_q1=q1, ms_q3=q3)


@pytest.mark.parametrize("variant", RESIDUAL_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES + CPU_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_residual_tail(benchmark, device: torch.device, shape: tuple[int, ...], variant: str) -> None:
    skip_unless_runs(device, shape, variant)
    x = torch.randn(shape, device=device, requires_grad=True)
    z = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    torch.manual_seed(0)
    module = build_tail(variant, shape[1], device)
    reference = build_tail("torch", shape[1], device)
    params = tuple(module.parameters())

    def step() -> tuple:
        return torch.autograd.grad(module(x, z), (x, z, *params), dy)

    expected = torch.autograd.grad(reference(x, z), (x, z, *reference.parameters()), dy)
    for mine, theirs in zip(step(), expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)

    benchmark.group = f"residual tail {'x'.join(map(str, shape))}"
    record(
        benchmark,
        step,
        device,
        suite="fusions",
        fusion="residual",
        variant=variant,
        shape=list(shape),
        dtype=dtype_name(x.dtype),
    )


@pytest.mark.parametrize("variant", LEAN_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES + CPU_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_memory_efficient(benchmark, device: torch.device, shape: tuple[int, ...], variant: str) -> None:
    skip_unless_runs(device, shape, variant)
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    torch.manual_seed(0)
    module = build_lean(variant, shape[1], device)
    reference = build_lean("torch", shape[1], device)
    params = tuple(module.parameters())

    def step() -> tuple:
        return torch.autograd.grad(module(x), (x, *params), dy)

    expected = torch.autograd.grad(reference(x), (x, *reference.parameters()), dy)
    for mine, theirs in zip(step(), expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)

    benchmark.group = f"memory-efficient BN+leaky_relu {'x'.join(map(str, shape))}"
    record(
        benchmark,
        step,
        device,
        suite="fusions",
        fusion="memory_efficient",
        variant=variant,
        shape=list(shape),
        dtype=dtype_name(x.dtype),
    )
