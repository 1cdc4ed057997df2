"""Memory the split kernels use during a launch and keep between calls: ticket counters and
partial results.

A split kernel's programs each store their partial results, then draw a ticket with an atomic add
(release-acquire, GPU scope) on their channel group's counter; the program that draws the last
ticket merges every partial of the group in a fixed order — so the bits do not depend on which
program finished last — and resets the counter to zero for the next call. No launch, memset or
host synchronization is spent on the counters, and no allocation on the partials, which are dead
once their launch ends: so both live here, allocated once per device and stream (launches on one
stream run one after another; two streams must not share them) and grown when a wider layer
comes. A launch that was given a buffer before it grew keeps it alive (``kernels/replay.py``).

CUDA graphs never get these. A launch captured into a graph gets buffers of its own, allocated in
the graph's memory pool as torch's own kernels do: the counters' zero fill is captured with it and
runs at every replay, and a graph replayed on another stream, or next to another graph captured on
the same stream, shares nothing with them or with eager calls. The kept buffers are allocated on a
helper thread, outside any memory pool that routes the calling thread's allocations (cudagraph
trees' warm-up runs, ``torch.cuda.use_mem_pool``): such a pool reclaims blocks it does not know
are alive, and would hand the kept memory to its own tensors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

_tickets: dict[tuple[torch.device, int], torch.Tensor] = {}
_partials: dict[tuple[torch.device, int], torch.Tensor] = {}


def _stream_handle(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def capturing(device: torch.device) -> bool:
    """Whether a kernel launched now on the current stream of ``device`` goes into a CUDA graph
    being captured rather than running."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _zeros_outside_pools(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(numel)`` on ``device``'s current stream, from the caching allocator's
    default pool whatever pool this thread's allocations are routed to."""
    if device.type != "cuda":
        return torch.zeros(numel, device=device, dtype=dtype)
    stream = torch.cuda.current_stream(device)

    def allocate() -> torch.Tensor:
        with torch.cuda.stream(stream):
            return torch.zeros(numel, device=stream.device, dtype=dtype)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tritonbn-workspace") as helper:
        return helper.submit(allocate).result()


def _kept(
    buffers: dict[tuple[torch.device, int], torch.Tensor],
    key: tuple[torch.device, int],
    numel: int,
    smallest: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = _zeros_outside_pools(max(numel, smallest), key[0], dtype)
    return buffer


def split_workspace(device: torch.device, numel: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, tickets) for one split launch on ``device``: at least ``numel`` float32 elements
    for its partial results (its programs write them, its last program merges them; any content)
    and at least ``groups`` int32 counters, all zero when the launch starts. Kept ones, or while
    a CUDA graph is being captured, the graph's own."""
    if capturing(device):
        return (
            torch.empty(numel, device=device, dtype=torch.float32),
            torch.zeros(groups, device=device, dtype=torch.int32),
        )
    key = (device, _stream_handle(device))
    return _kept(_partials, key, numel, 4096, torch.float32), _kept(_tickets, key, groups, 256, torch.int32)


def is_workspace(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is kept here (between calls, not allocated by one)."""
    return any(tensor is kept for buffers in (_tickets, _partials) for kept in buffers.values())
