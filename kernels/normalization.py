"""The per-channel map every kernel applies or differentiates, as kernel arguments:
z = (x − mean)·a + b with a = invstd·γ and b = β, then y = act(z). The forward and the backward
kernels both take it.

Where the statistics come from (the kernels' ``STATS`` constexpr, read by
``tiling.channel_affine``): ``RUNNING`` — the running mean and variance (eval; the kernel takes
rsqrt(var + eps)); ``SAVED`` — the training forward's save, mean and invstd in rows 0 and 1;
``FOLDED`` — the split forward's save, whose rows 2 and 3 already hold a and b. One tensor
carries the saved rows, so a call builds no views of it.
"""

from typing import NamedTuple

import torch

RUNNING = 0
SAVED = 1
FOLDED = 2


class Normalization(NamedTuple):
    """``stats`` (running mean, or a save), ``var`` (running variance, RUNNING only), the
    parameters, the ``stats_source`` (RUNNING, SAVED or FOLDED), ``eps`` (RUNNING only), the
    ``activation`` code and leaky_relu's ``slope``. A named tuple: one is built on every call."""

    stats: torch.Tensor
    var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    stats_source: int
    eps: float
    activation: int
    slope: float

    def args(self, channels: int) -> tuple[object, ...]:
        """(stats, var, weight, bias, C, eps, slope): the kernels' arguments in this order."""
        return (self.stats, self.var, self.weight, self.bias, channels, float(self.eps), float(self.slope))

    def parameter_grads(
        self, x: torch.Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Uninitialized (dγ, dβ) in the parameters' dtypes (float32 without one), or None."""
        grads = []
        for param, needed in ((self.weight, need_weight), (self.bias, need_bias)):
            if not needed:
                grads.append(None)
            elif param is not None and param.is_contiguous():
                grads.append(torch.empty_like(param))
            else:
                dtype = torch.float32 if param is None else param.dtype
                grads.append(x.new_empty(x.shape[1], dtype=dtype))
        return grads[0], grads[1]

    def meta(self) -> dict[str, object]:
        return {
            "STATS": self.stats_source,
            "HAS_WEIGHT": self.weight is not None,
            "HAS_BIAS": self.bias is not None,
            "ACTIVATION": self.activation,
        }
