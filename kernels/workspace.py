"""Ticket counters of the "last program combines" protocol, kept between calls.

A split kernel's programs each store their partial results, then draw a ticket with an atomic add
(release-acquire, GPU scope) on their channel group's counter; the program that draws the last
ticket merges every partial of the group in a fixed order — so the bits do not depend on which
program finished last — and resets the counter to zero for the next call. No launch, memset or
host synchronization is spent on the counters, which is why they live here, allocated once per
device and stream (two streams must not share counters) and grown when a wider layer comes.
"""

from __future__ import annotations

import torch

_tickets: dict[tuple[torch.device, int], torch.Tensor] = {}


def _stream_handle(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def tickets(device: torch.device, groups: int) -> torch.Tensor:
    """At least ``groups`` int32 counters on ``device``, all zero between kernel launches."""
    key = (device, _stream_handle(device))
    counters = _tickets.get(key)
    if counters is None or counters.numel() < groups:
        counters = torch.zeros(max(groups, 256), device=device, dtype=torch.int32)
        _tickets[key] = counters
    return counters


def is_workspace(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is one of the ticket counters (kept between calls, not allocated by one)."""
    return any(tensor is counters for counters in _tickets.values())
