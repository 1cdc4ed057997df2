"""Drop-in modules: ``BatchNorm1d``/``BatchNorm2d`` subclass torch's and run on tritonbn's
dispatcher; ``BatchNorm(num_features, num_dims)`` is the seed notebook's class API on top of them.
Each takes an optional ``activation`` fused after the normalization (see ``tritonbn.batch_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import (
    check_activation,
    check_batch_norm_args,
    check_module_input,
    check_module_options,
)
from ._compat import batchnorm_bias_kwargs
from .dispatch import select_plan
from .functional import run_checked

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "activation_repr"]


class _TritonBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's _BatchNorm behaviour, validated before any state changes, on tritonbn's kernels.

    ``activation`` (None, ``"relu"``, ``"sigmoid"``, ``"leaky_relu"`` with ``negative_slope``,
    ``"silu"``, ``"tanh"``) makes the module return ``act(batch_norm(input))``; it is a plain
    attribute, not state: the state_dict keeps torch's five keys.
    """

    _expected_dims: tuple[int, ...] = ()
    _expected_shape: str = ""
    # Class defaults: a torch module whose class ``convert`` swapped never ran __init__.
    activation: str | None = None
    negative_slope: float = 0.01

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        check_module_options(num_features, eps, momentum)
        check_activation(activation, negative_slope)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            **batchnorm_bias_kwargs(type(self).__name__, bias),
        )
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_module_input(self, input, self._expected_dims, self._expected_shape,
                           self.num_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # Parameters and buffers are read once: each read goes through Module.__getattr__.
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        training, activation = self.training, self.activation
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        momentum = 0.0 if self.momentum is None else self.momentum
        check_batch_norm_args(
            input, running_mean, running_var, weight, bias, bn_training, momentum, self.eps
        )
        if activation is not None:
            check_activation(activation, self.negative_slope)
        # The dispatcher may refuse the call too: ask it before counting the batch.
        plan = select_plan(input, bn_training)
        counter = self.num_batches_tracked
        if training and self.track_running_stats and counter is not None:
            counter.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(counter)
        return run_checked(
            input, running_mean, running_var, weight, bias, bn_training, momentum, self.eps,
            activation=activation, negative_slope=self.negative_slope, plan=plan,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + activation_repr(self.activation, self.negative_slope)


def activation_repr(activation: str | None, negative_slope: float) -> str:
    """The ``extra_repr`` suffix of a fused activation: empty without one."""
    if activation is None:
        return ""
    text = f", activation={activation!r}"
    if activation == "leaky_relu":
        text += f", negative_slope={negative_slope}"
    return text


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """Drop-in ``torch.nn.BatchNorm1d`` over (N, C) or (N, C, L) input, on tritonbn."""

    _expected_dims = (2, 3)
    _expected_shape = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """Drop-in ``torch.nn.BatchNorm2d`` over (N, C, H, W) input, on tritonbn."""

    _expected_dims = (4,)
    _expected_shape = "4D (N, C, H, W)"


class BatchNorm(_TritonBatchNorm):
    """The seed notebook's ``BatchNorm(num_features, num_dims)``: 2 for (N, C) fully-connected
    input, 4 for (N, C, H, W) convolution input.

    Same numerics as ``BatchNorm1d``/``BatchNorm2d`` (torch's conventions), with the statistics as
    registered buffers, so they follow ``.to()``, are saved in the state_dict and never carry
    autograd history. ``gamma``/``beta`` and ``moving_mean``/``moving_var`` name the notebook's
    attributes.
    """

    def __init__(
        self,
        num_features: int,
        num_dims: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        if num_dims not in (2, 4):
            raise ValueError(f"'num_dims' must be 2 or 4, got {num_dims!r}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            activation=activation, negative_slope=negative_slope,
        )
        self.num_dims = num_dims
        self._expected_dims = (num_dims,)
        self._expected_shape = "2D (N, C)" if num_dims == 2 else "4D (N, C, H, W)"

    @property
    def gamma(self) -> nn.Parameter | None:
        return self.weight

    @property
    def beta(self) -> nn.Parameter | None:
        return self.bias

    @property
    def moving_mean(self) -> torch.Tensor | None:
        return self.running_mean

    @property
    def moving_var(self) -> torch.Tensor | None:
        return self.running_var

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_dims={self.num_dims}"
