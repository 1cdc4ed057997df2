"""Triton kernels for batch normalization and their launchers (installed as ``tritonbn.kernels``).

One file per kernel family: ``stats`` (training statistics of the split plans), ``normalize``
(the elementwise forward: training normalize, eval forward), ``backward`` (the split plans' and
eval backward), ``fused_small`` (single-launch forward and backward); ``activation`` holds the
fused activations and their derivatives, ``tiling`` the shared ``@triton.jit`` helpers,
``normalization`` the per-channel map as kernel arguments. Host side: ``plans`` (the plan table
and launch geometry), ``layout`` (the (N, C, S) view), ``launch`` (launch records),
``workspace`` (the last-program tickets), ``runtime`` (interpreter or compiled) and ``ops`` (the
entry points).
"""

from .layout import Layout, describe
from .ops import backward_eval, backward_train, forward_eval, forward_train, saved_rows
from .plans import FUSED_MAX_TILE, KERNEL_PLANS, PLANS, KernelPlan
from .runtime import interpreted

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
    "forward_train",
    "interpreted",
    "saved_rows",
]
