"""Triton kernels for batch normalization and their launchers (installed as ``tritonbn.kernels``).

One file per kernel family: ``stats`` (training statistics of the split plans), ``normalize``
(the elementwise forward: training normalize, eval forward), ``backward`` (the split plans' and
eval backward), ``fused_small`` (single-launch forward and backward); ``activation`` holds the
fused activations and their derivatives, ``tiling`` the shared ``@triton.jit`` helpers,
``normalization`` the per-channel map as kernel arguments. Host side: ``plans`` (the plan table
and launch geometry), ``occupancy`` (the split fitted to the programs an SM holds), ``layout``
(the (N, C, S) view), ``launch`` (launch records), ``workspace`` (the last-program tickets),
``runtime`` (interpreter or compiled) and ``ops`` (the entry points).
"""

import importlib

from .layout import Layout, describe
from .plans import FUSED_MAX_TILE, KERNEL_PLANS, PLANS, KernelPlan
from .runtime import interpreted

# The entry points import Triton: loaded at first use, so that ``import tritonbn`` works where
# Triton is not installed (the CPU fallback and the reference need none of it).
_TRITON_ENTRY_POINTS = (
    "backward_eval",
    "backward_train",
    "forward_eval",
    "forward_site",
    "forward_train",
)

__all__ = [
    "FUSED_MAX_TILE",
    "KERNEL_PLANS",
    "PLANS",
    "KernelPlan",
    "Layout",
    "backward_eval",
    "backward_train",
    "describe",
    "forward_eval",
    "forward_site",
    "forward_train",
    "interpreted",
]


def __getattr__(name: str) -> object:
    if name in _TRITON_ENTRY_POINTS:
        value = getattr(importlib.import_module(".ops", __name__), name)
        globals()[name] = value  # later reads find it without coming here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
