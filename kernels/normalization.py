"""The per-channel map every kernel applies or differentiates, as kernel arguments:
z = (x − mean)·invstd·weight + bias, then y = act(z). The forward and the backward kernels
both take it.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    """The per-channel map a kernel applies or differentiates: z = (x − mean)·invstd·weight + bias,
    then y = act(z). ``invstd`` holds the variance when ``invstd_is_var`` (eval: the kernel takes
    rsqrt(var + eps)); ``activation`` is an ``activation_code``, ``slope`` leaky_relu's slope."""

    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    invstd_is_var: bool = False
    eps: float = 0.0
    activation: int = 0
    slope: float = 0.0

    def args(self, channels: int) -> tuple[object, ...]:
        """(mean, invstd, weight, bias, C, eps, slope): the kernels' arguments in this order."""
        return (self.mean, self.invstd, self.weight, self.bias, channels, float(self.eps),
                float(self.slope))

    def parameter_grads(self, x: torch.Tensor, need_weight: bool, need_bias: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Uninitialized (dγ, dβ) in the parameters' dtypes (float32 without one), or None."""
        channels = x.shape[1]

        def grad_of(param: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
            dtype = param.dtype if param is not None else torch.float32
            return torch.empty(channels, device=x.device, dtype=dtype) if needed else None

        return grad_of(self.weight, need_weight), grad_of(self.bias, need_bias)

    def meta(self) -> dict[str, object]:
        return {
            "INVSTD_IS_VAR": self.invstd_is_var,
            "HAS_WEIGHT": self.weight is not None,
            "HAS_BIAS": self.bias is not None,
            "ACTIVATION": self.activation,
        }
