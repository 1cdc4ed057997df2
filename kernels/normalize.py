"""The elementwise forward pass: y = act((x − mean)·invstd·γ + β) per channel, with invstd saved
by ``stats`` (training normalize of the split plans) or rsqrt(running_var + eps) folded in-kernel
(the one-launch eval forward); ``act`` is the fused activation (none by default).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activation import activate
from .plans import Geometry
from .tiling import affine_rows, tile_offsets


@triton.jit
def normalize_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, C, eps, slope,
                     R, K, KB, stride_r, stride_k, stride_c, BLOCKS_PER_SPLIT,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     CHANNEL_MAJOR: tl.constexpr, INT64: tl.constexpr,
                     INVSTD_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr):
    # y = act((x − mean)·a + b) with per-channel a = invstd·γ and b = β, loaded once per program
    # and broadcast over its tiles.
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    mean, a, b = affine_rows(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, eps, pid_k, C, BLOCK_K,
                             CHANNEL_MAJOR, INVSTD_IS_VAR, HAS_WEIGHT, HAS_BIAS)
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        offsets, mask = tile_offsets(pid_k, first + i, R, K, KB, stride_r, stride_k, stride_c,
                                     BLOCK_R, BLOCK_K, CHANNEL_MAJOR, INT64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = activate((x - mean) * a + b, ACTIVATION, slope)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


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


def normalize(x: torch.Tensor, geo: Geometry, norm: Normalization) -> torch.Tensor:
    """y = act((x − mean)·invstd·weight + bias) in ``x``'s dtype and strides."""
    y = torch.empty_like(x)
    normalize_kernel[geo.grid](x, y, *norm.args(x.shape[1]), *geo.args(), **norm.meta(), **geo.meta())
    return y
