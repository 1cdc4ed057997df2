"""The CUDA path captures in a CUDA graph: no host synchronization, no ``.item()``, dispatch from
shapes alone. A training step (forward, backward, running statistics) of a model using tritonbn is
captured once and replayed on new data; it must match the same step run eagerly. Needs a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tritonbn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        tritonbn.BatchNorm2d(8, activation="relu"),
        nn.Flatten(),
        nn.Linear(8 * 14 * 14, 32),
        tritonbn.BatchNorm1d(32),
        nn.Linear(32, 10),
    ).cuda()


def test_training_step_replays_like_eager():
    model = small_net()
    static_x = torch.randn(16, 3, 16, 16, device="cuda")
    # Warm up on a side stream: kernels compile and autograd's buffers exist before the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    eager = copy.deepcopy(model)  # the state the graph will start from: capture runs nothing

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.square().mean().backward()

    x = torch.randn(16, 3, 16, 16, device="cuda")
    static_x.copy_(x)
    graph.replay()
    y = eager(x)
    y.square().mean().backward()
    torch.cuda.synchronize()

    torch.testing.assert_close(static_y, y, rtol=1e-4, atol=1e-5)
    for (name, captured), (_, expected) in zip(
        model.named_parameters(), eager.named_parameters(), strict=True
    ):
        torch.testing.assert_close(captured.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, captured), (_, expected) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-6, msg=name)
