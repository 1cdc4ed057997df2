"""The fused activations, one table: each entry's name, its kernel code, the torch module that
``tritonbn.convert(..., fuse_activations=True)`` folds into a BatchNorm, and the torch function
that the CPU fallback, the reference and the tests apply. Plain Python (no Triton), so validation
and the fallback work without Triton.

Adding an activation is an entry here plus its math in ``activation.py`` (``activate`` and
``activation_grad``, selected by the entry's code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Activation:
    """A fused activation: ``code`` is the kernels' ``ACTIVATION`` constexpr (0 is none);
    ``apply(y, negative_slope)`` is torch's own op, out of place."""

    name: str
    code: int
    module: type[nn.Module]
    apply: Callable[[torch.Tensor, float], torch.Tensor]


TABLE: tuple[Activation, ...] = (
    Activation("relu", 1, nn.ReLU, lambda y, slope: torch.relu(y)),
    Activation("sigmoid", 2, nn.Sigmoid, lambda y, slope: torch.sigmoid(y)),
    Activation("leaky_relu", 3, nn.LeakyReLU, F.leaky_relu),
    Activation("silu", 4, nn.SiLU, lambda y, slope: F.silu(y)),
    Activation("tanh", 5, nn.Tanh, lambda y, slope: torch.tanh(y)),
)

BY_NAME: dict[str, Activation] = {entry.name: entry for entry in TABLE}
# The names the kernels and modules accept, in code order.
ACTIVATIONS: tuple[str, ...] = tuple(BY_NAME)


def activation_code(name: str | None) -> int:
    """The ``ACTIVATION`` constexpr of activation ``name`` (None: 0); ValueError for others."""
    if name is None:
        return 0
    entry = BY_NAME.get(name)
    if entry is None:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return entry.code
