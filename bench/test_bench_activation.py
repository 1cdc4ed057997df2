"""Fused BatchNorm + activation against BatchNorm followed by the activation module: time of
forward+backward, and the memory a training forward leaves held for the backward.

The fused module is ``tritonbn.BatchNorm2d/1d(activation=...)``; the unfused pair is
``torch.nn.BatchNorm2d/1d`` then ``nn.ReLU``/``nn.Sigmoid``/``nn.SiLU`` — what a network has
without tritonbn. Each test first checks that both give the same output and gradients, so with
``--benchmark-disable`` it is a test too. On a CPU tritonbn's module runs torch's batch norm and
then torch's activation, so only the LeNet layers run there, as a check; the figures that matter
come from a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cases import dtype_name
from measure import time_step
from torch import nn

import tritonbn

SHAPES = ((256, 6, 24, 24), (256, 120), (32, 64, 112, 112), (32, 256, 56, 56))
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
VARIANTS = ("fused", "unfused")
CPU_SHAPES = ((256, 6, 24, 24), (256, 120))
# When this suite runs among the others (bench/cases.py's tiers): after the float32
# forward+backward of tritonbn and torch, as it holds the fused-activation target.
TIER = 1


def shape_param(shape: tuple[int, ...]) -> object:
    """``shape`` as a parameter, skipped without CUDA unless it is one of CPU_SHAPES."""
    runs = torch.cuda.is_available() or shape in CPU_SHAPES
    marks = () if runs else pytest.mark.skip(reason="no CUDA: only the LeNet layers are checked on a CPU")
    return pytest.param(shape, marks=marks, id="x".join(map(str, shape)))


def build(variant: str, activation: str, channels: int, dims: int, device: torch.device) -> nn.Module:
    """The fused tritonbn module, or torch's BatchNorm followed by the activation module."""
    torch.manual_seed(0)
    if variant == "fused":
        cls = tritonbn.BatchNorm2d if dims == 4 else tritonbn.BatchNorm1d
        return cls(channels, activation=activation).to(device)
    cls = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    return nn.Sequential(cls(channels), ACTIVATIONS[activation]()).to(device)


def held_bytes(module: nn.Module, x: torch.Tensor) -> int | None:
    """CUDA memory a training forward leaves allocated (output and what autograd saved for the
    backward); None off CUDA."""
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    y = module(x)
    torch.cuda.synchronize(x.device)
    held = torch.cuda.memory_allocated(x.device) - before
    del y
    return held


def forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], tuple]:
    params = tuple(module.parameters())
    return lambda: torch.autograd.grad(module(x), (x, *params), dy)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [shape_param(shape) for shape in SHAPES])
def test_fused_activation(
    benchmark, device: torch.device, shape: tuple[int, ...], activation: str, variant: str
) -> None:
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    module = build(variant, activation, shape[1], len(shape), device)
    other = build("unfused" if variant == "fused" else "fused", activation, shape[1], len(shape), device)
    step = forward_backward(module, x, dy)
    # Before timing: the two variants agree (same initial parameters, same batch statistics).
    for mine, theirs in zip(step(), forward_backward(other, x, dy)(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)

    benchmark.group = f"fused activation {'x'.join(map(str, shape))} {activation}"
    times = time_step(benchmark, step, device)
    benchmark.extra_info.update(
        {
            "suite": "activation",
            "variant": variant,
            "activation": activation,
            "shape": list(shape),
            "dtype": dtype_name(x.dtype),
            "held_bytes": held_bytes(module, x),
        }
    )
    if times is not None:
        median, q1, q3 = times
        benchmark.extra_info.update(ms=median, ms_q1=q1, ms_q3=q3)
