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


def _workspace_pointers(monkeypatch) -> list[int]:
    """The data pointers of the workspace (ticket counters, partials) every split launch from
    here on is given: the int32 counters, and any kept buffer."""
    from tritonbn.kernels import launch, workspace

    pointers: list[int] = []
    original = launch.Launcher.__call__

    def noting(self, key, grid, args, meta):
        for arg in args:
            if isinstance(arg, torch.Tensor) and (arg.dtype == torch.int32 or workspace.is_workspace(arg)):
                pointers.append(arg.data_ptr())
        return original(self, key, grid, args, meta)

    monkeypatch.setattr(launch.Launcher, "__call__", noting)
    return pointers


def _split_step(x, weight, bias, running):
    with tritonbn.backend("triton", plan="split-welford"):
        y = tritonbn.batch_norm(x, *running, weight, bias, training=True, momentum=0.1, eps=1e-5)
    y.square().mean().backward()
    return y.detach()


def _torch_step(x, weight, bias, running):
    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    y = torch.nn.functional.batch_norm(x, *running, weight, bias, True, 0.1, 1e-5)
    return (y.detach(), *torch.autograd.grad(y.square().mean(), (weight, bias)))


def test_graphs_captured_on_one_stream_share_no_workspace(monkeypatch):
    # Two graphs captured one after the other on torch's capture stream, each with split launches
    # forward and backward: each must get counters and partials of its own, none kept for eager
    # calls, and replay right in any order — the second before the first has ever run, then both
    # at once on two streams.
    from tritonbn.kernels import workspace

    torch.manual_seed(0)
    statics = [torch.randn(32, 3, 40, 40, device="cuda"), torch.randn(8, 3, 64, 64, device="cuda")]
    params = [[torch.randn(3, device="cuda").requires_grad_() for _ in range(2)] for _ in statics]
    runnings = [[torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")] for _ in statics]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels, fill the kept workspace
        for x, (weight, bias) in zip(statics, params, strict=True):
            _split_step(x, weight, bias, [torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")])
    torch.cuda.current_stream().wait_stream(side)
    for weight, bias in params:
        weight.grad = bias.grad = None
    kept = {t.data_ptr() for buffers in (workspace._tickets, workspace._partials) for t in buffers.values()}
    pointers = _workspace_pointers(monkeypatch)
    graphs, outputs, used = [], [], []
    for x, (weight, bias), running in zip(statics, params, runnings, strict=True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(_split_step(x, weight, bias, running))
        graphs.append(graph)
        used.append(set(pointers))
        del pointers[:]
    assert used[0] and used[1], "no split launch was captured"
    assert not (used[0] & used[1]) and not ((used[0] | used[1]) & kept), (used, kept)

    expected_running = [[torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")] for _ in statics]
    for round_ in range(3):
        for x in statics:
            x.copy_(torch.randn_like(x))
        if round_ == 0:  # the second graph first
            graphs[1].replay()
            graphs[0].replay()
        else:  # both at once, on two streams
            streams = [torch.cuda.Stream(), torch.cuda.Stream()]
            for graph, stream in zip(graphs, streams, strict=True):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    graph.replay()
            for stream in streams:
                torch.cuda.current_stream().wait_stream(stream)
        for i, x in enumerate(statics):
            y, dw, db = _torch_step(x, *params[i], expected_running[i])  # updates expected_running
            torch.testing.assert_close(outputs[i], y, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close([params[i][0].grad, params[i][1].grad], [dw, db], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(runnings[i], expected_running[i], rtol=1e-5, atol=1e-6)


def test_kept_workspace_stays_out_of_a_routed_memory_pool(monkeypatch):
    # A pool that routes this thread's allocations gets the call's tensors, never the workspace
    # kept between calls: cudagraph trees route allocations so while warming up, and reclaim the
    # blocks of their pool that they do not know are alive.
    from tritonbn.kernels import workspace

    monkeypatch.setattr(workspace, "_tickets", {})
    monkeypatch.setattr(workspace, "_partials", {})
    x = torch.randn(32, 3, 40, 40, device="cuda")
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool), tritonbn.backend("triton", plan="split-welford"):
        y = tritonbn.batch_norm(x, None, None, training=True)
    torch.cuda.synchronize()
    segments = [(s["address"], s["address"] + s["total_size"]) for s in pool.snapshot(include_traces=False)]

    def in_pool(tensor):
        return any(start <= tensor.data_ptr() < end for start, end in segments)

    kept = [*workspace._tickets.values(), *workspace._partials.values()]
    assert len(kept) == 2 and in_pool(y)
    assert not any(in_pool(tensor) for tensor in kept)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_compiled_with_cuda_graphs_matches_eager():
    # torch.compile(mode="reduce-overhead"): cudagraph trees warm up in their memory pool, then
    # capture and replay; training steps of a split-plan layer match eager, step after step. (One
    # layer: inductor's compile time counts against the GPU run's budget.) Each step starts from no
    # gradients: a replay overwrites the graph's outputs, the last step's gradients among them.
    torch.manual_seed(0)
    eager = tritonbn.BatchNorm2d(3, activation="relu").cuda()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, mode="reduce-overhead")
    for step in range(5):
        x = torch.randn(16, 3, 20, 20, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        torch.compiler.cudagraph_mark_step_begin()
        eager.zero_grad(set_to_none=True)
        compiled_net.zero_grad(set_to_none=True)
        with tritonbn.backend("triton", plan="split-welford"):
            for model in (compiled, eager):
                model(x).square().mean().backward()
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled_net.named_parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, a), (_, b) in zip(eager.named_buffers(), compiled_net.named_buffers(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
