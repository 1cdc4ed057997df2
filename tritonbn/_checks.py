"""Argument validation shared by every backend.

All checks run before anything is computed or mutated, so a call that raises leaves the running
statistics (and a module's ``num_batches_tracked``) exactly as they were. Exception types follow
torch.nn.functional.batch_norm; messages name the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Container
from numbers import Real

import torch

from tritonbn.kernels.activation_table import ACTIVATIONS

from ._compat import EVAL_ACCEPTS_ZERO_EPS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _is_real(value: object) -> bool:
    """A real number that is not a bool (the float test first: it is the hot path of every call),
    symbolic ones included (torch.compile with dynamic=True traces floats as SymFloat)."""
    return type(value) is float or (
        not isinstance(value, bool) and isinstance(value, Real | torch.SymFloat | torch.SymInt)
    )


def _finite(value: float) -> bool:
    """Whether ``value`` is finite, by comparisons only (NaN fails both), so that a symbolic value
    under torch.compile traces too."""
    return -math.inf < value < math.inf


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_batch_norm_args(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    """Raise the error torch would raise (with a clearer message) for a malformed call.

    Promises: returns None for every call that ``torch.nn.functional.batch_norm`` accepts with
    the same meaning, and raises before any tensor is touched otherwise.
    """
    check_input(input)
    channels = input.shape[1]
    device, dtype = input.device, input.dtype
    allowed = (dtype, torch.float32) if dtype in _HALF_DTYPES else (dtype,)
    for name, tensor in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"batch_norm: '{name}' must be a torch.Tensor or None, got {type(tensor).__name__}"
            )
        if tensor.numel() != channels:
            raise RuntimeError(
                f"batch_norm: '{name}' must have {channels} elements (one per channel of 'input' "
                f"of shape {tuple(input.shape)}), got {tensor.numel()}"
            )
        if name.startswith("running") and tensor.dim() != 1:
            # torch reads the running statistics as vectors (weight and bias of any shape).
            raise RuntimeError(f"batch_norm: '{name}' must be a 1-D tensor, got shape {tuple(tensor.shape)}")
        if tensor.device != device:
            raise RuntimeError(
                f"batch_norm: '{name}' must be on the same device as 'input' ({device}), got {tensor.device}"
            )
        if tensor.dtype not in allowed:
            expected = " or ".join(sorted(_dtype_name(d) for d in allowed))
            raise RuntimeError(
                f"batch_norm: '{name}' must have dtype {expected} for a "
                f"{_dtype_name(dtype)} 'input', got {_dtype_name(tensor.dtype)}"
            )
        if name.startswith("running") and tensor.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"batch_norm: '{name}' must not require grad (running statistics are updated in "
                "place, not differentiated), got a tensor with requires_grad=True"
            )
    if not training and (running_mean is None or running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(
            f"batch_norm: '{missing}' must be a tensor in evaluation mode (training=False), got None"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: 'running_mean' and 'running_var' must both be tensors or both be None, "
            f"got {type(running_mean).__name__} and {type(running_var).__name__}"
        )
    check_hyperparameters(training, momentum, eps)
    if training and input.numel() > 0 and input.numel() // channels <= 1:
        raise _one_value_per_channel(input)


def check_hyperparameters(training: bool, momentum: float, eps: float) -> None:
    """The checks of ``momentum`` (a real in [0, 1]) and ``eps`` (finite and > 0; 0 too in eval
    where this torch allows it): the part of ``check_batch_norm_args`` that torch itself does not
    make, so that the torch fallback, which leaves the tensor checks to torch, still makes it."""
    if not _is_real(momentum):
        if isinstance(momentum, torch.Tensor):
            raise TypeError(
                "batch_norm: 'momentum' must be a float or a 0-D real tensor, got a "
                f"{momentum.dim()}-D {_dtype_name(momentum.dtype)} tensor of shape {tuple(momentum.shape)}"
            )
        raise TypeError(f"batch_norm: 'momentum' must be a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch_norm: 'momentum' must be in [0, 1], got {momentum}")
    if not _is_real(eps):
        raise TypeError(f"batch_norm: 'eps' must be a float, got {type(eps).__name__}")
    zero_allowed = not training and EVAL_ACCEPTS_ZERO_EPS
    if not _finite(eps) or eps < 0 or (eps == 0 and not zero_allowed):
        expected = "a finite number >= 0" if zero_allowed else "a finite number > 0"
        raise ValueError(f"batch_norm: 'eps' must be {expected}, got {eps}")


def check_input(input: object, owner: str = "batch_norm") -> None:
    """The checks of ``input`` alone: a torch.Tensor (TypeError) of at least 2 dimensions
    (ValueError) and a supported floating dtype (NotImplementedError, torch's type). Messages
    start with ``owner``."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{owner}: 'input' must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"{owner}: 'input' must have at least 2 dimensions (N, C, *), "
            f"got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    if input.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"{owner}: 'input' must be float16, bfloat16, float32 or float64, got {_dtype_name(input.dtype)}"
        )


def check_training_input(input: torch.Tensor, training: bool) -> None:
    """Training needs more than one value per channel (ValueError, like torch); ``input`` has
    passed ``check_input``."""
    if training and input.numel() > 0 and input.numel() // input.shape[1] <= 1:
        raise _one_value_per_channel(input)


def _one_value_per_channel(input: torch.Tensor) -> ValueError:
    return ValueError(
        f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
    )


def momentum_value(momentum: object) -> object:
    """``momentum`` as the functional uses it: a 0-D real tensor (which torch's batch_norm accepts)
    becomes its Python float; anything else is returned unchanged for the checks to judge."""
    if (
        isinstance(momentum, torch.Tensor)
        and momentum.dim() == 0
        and not momentum.is_complex()
        and momentum.dtype != torch.bool
    ):
        return float(momentum)
    return momentum


def check_module_options(num_features: object, eps: object, momentum: object, *, lazy: bool = False) -> int:
    """Validate a module constructor's options; return ``num_features`` as an ``int``.

    ``num_features``: a positive integer of any integral type (``int``, ``numpy.int64``, anything
    with ``__index__``) but bool; 0 only for a Lazy module (``lazy=True``), which learns it from
    its first input. ``eps``: a finite real >= 0 (torch builds a module with eps=0; torch's
    batch_norm then refuses it in training, and everywhere before torch 2.14). ``momentum``:
    None or a real in [0, 1].
    """
    minimum = 0 if lazy else 1
    try:
        count = None if isinstance(num_features, bool) else operator.index(num_features)
    except TypeError:
        count = None
    if count is None or count < minimum:
        expected = "a non-negative int" if lazy else "a positive int"
        raise ValueError(f"'num_features' must be {expected}, got {num_features!r}")
    if not _is_real(eps):
        raise TypeError(f"'eps' must be a float, got {type(eps).__name__}")
    if not _finite(eps) or eps < 0:
        raise ValueError(f"'eps' must be a finite number >= 0, got {eps}")
    if momentum is not None:
        if not _is_real(momentum):
            raise TypeError(f"'momentum' must be a float or None, got {type(momentum).__name__}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"'momentum' must be in [0, 1] or None, got {momentum}")
    return count


def check_activation(activation: str | None, negative_slope: float) -> None:
    """Validate a fused activation: ``activation`` None or one of ``ACTIVATIONS`` (ValueError
    otherwise), ``negative_slope`` (leaky_relu's slope, ignored by the others) a finite real."""
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATIONS):
        valid = ", ".join(repr(name) for name in ACTIVATIONS)
        raise ValueError(f"'activation' must be None or one of {valid}, got {activation!r}")
    if not _is_real(negative_slope):
        raise TypeError(f"'negative_slope' must be a float, got {type(negative_slope).__name__}")
    if not _finite(negative_slope):
        raise ValueError(f"'negative_slope' must be a finite number, got {negative_slope}")


def check_module_input(
    module: object, input: object, dims: Container[int], expected: str, num_features: int
) -> None:
    """The checks of a BatchNorm module's ``_check_input_dim``: a tensor (TypeError) with a number
    of dimensions in ``dims``, described by ``expected`` (ValueError), and ``num_features``
    channels (RuntimeError). Messages start with the module's class name."""
    owner = type(module).__name__
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{owner}: 'input' must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in dims:
        raise ValueError(
            f"{owner}: 'input' must be {expected}, got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    if input.shape[1] != num_features:
        raise RuntimeError(
            f"{owner}: 'input' must have num_features={num_features} channels in dim 1, got "
            f"{input.shape[1]} (input shape {tuple(input.shape)})"
        )
