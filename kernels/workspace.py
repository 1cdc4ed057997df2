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
"""

from __future__ import annotations

import torch

_tickets: dict[tuple[torch.device, int], torch.Tensor] = {}
_partials: dict[tuple[torch.device, int], torch.Tensor] = {}


def _stream_handle(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def _kept(
    buffers: dict[tuple[torch.device, int], torch.Tensor],
    device: torch.device,
    numel: int,
    smallest: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    key = (device, _stream_handle(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.zeros(max(numel, smallest), device=device, dtype=dtype)
    return buffer


def tickets(device: torch.device, groups: int) -> torch.Tensor:
    """At least ``groups`` int32 counters on ``device``, all zero between kernel launches."""
    return _kept(_tickets, device, groups, 256, torch.int32)


def partials(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` float32 elements on ``device`` for one launch's partial results (its
    programs write them, its last program merges them): any content between launches."""
    return _kept(_partials, device, numel, 4096, torch.float32)


def is_workspace(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is kept here (between calls, not allocated by one)."""
    return any(tensor is kept for buffers in (_tickets, _partials) for kept in buffers.values())
