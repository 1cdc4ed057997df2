"""Drop-in modules: ``BatchNorm1d``/``BatchNorm2d``/``BatchNorm3d`` (and their ``Lazy`` forms)
subclass torch's and run on tritonbn's dispatcher; ``FrozenBatchNorm2d`` is torchvision's
eval-only BatchNorm; ``BatchNorm(num_features, num_dims)`` is the seed notebook's class API.
Each takes an optional ``activation`` fused after the normalization (see ``tritonbn.batch_norm``);
``forward(input, residual=None)`` adds a residual before the activation, and the trainable ones
take ``memory_efficient=True`` (save the output instead of the input).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.nn.modules.lazy import LazyModuleMixin

from . import eager
from ._checks import (
    check_activation,
    check_batch_norm_args,
    check_module_input,
    check_module_options,
    momentum_value,
)
from ._compat import batchnorm_bias_kwargs
from .dispatch import Plan, select_plan, sm_count
from .functional import check_fusion, check_memory_efficient, run_checked, torch_fallback

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm2d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "activation_repr",
    "script_unsupported",
]


def script_unsupported(module: nn.Module) -> RuntimeError:
    """The error ``torch.jit.script`` meets on a tritonbn module (through its
    ``__prepare_scriptable__``, which scripting calls on every submodule before compiling)."""
    return RuntimeError(
        f"{type(module).__name__}: torch.jit.script does not support tritonbn modules (TorchScript "
        "cannot call Python dispatch or Triton kernels). Use torch.compile(model) or "
        "torch.export.export(model, args), which trace tritonbn's kernels as custom ops, or keep "
        "torch.nn's BatchNorm in a model that must be scripted."
    )


class _TritonBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's _BatchNorm behaviour, validated before any state changes, on tritonbn's kernels.

    ``activation`` (None, ``"relu"``, ``"sigmoid"``, ``"leaky_relu"`` with ``negative_slope``,
    ``"silu"``, ``"tanh"``) makes the module return ``act(batch_norm(input))``; it is a plain
    attribute, not state: the state_dict keeps torch's five keys. ``module(input, residual=z)``
    returns ``act(batch_norm(input) + z)`` in the same kernels. ``memory_efficient=True`` saves the
    output instead of the input for the backward (invertible activations only: None or
    leaky_relu with a positive slope; see ``tritonbn.batch_norm``).
    """

    _expected_dims: tuple[int, ...] = ()
    _expected_shape: str = ""
    # Class defaults: a torch module whose class ``convert`` swapped never ran __init__.
    activation: str | None = None
    negative_slope: float = 0.01
    memory_efficient: bool = False
    # The calls the eager fast path remembers (tritonbn.eager); created at the first one.
    _eager_calls: eager.EagerCalls | None = None

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
        memory_efficient: bool = False,
    ) -> None:
        # A Lazy module is built with num_features=0, set when its first input arrives.
        num_features = check_module_options(
            num_features, eps, momentum, lazy=isinstance(self, LazyModuleMixin)
        )
        check_activation(activation, negative_slope)
        check_memory_efficient(memory_efficient, activation, negative_slope)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            **batchnorm_bias_kwargs(type(self).__name__, bias),
        )
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.memory_efficient = memory_efficient

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this on every submodule first: fail there with the way out."""
        raise script_unsupported(self)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_module_input(self, input, self._expected_dims, self._expected_shape, self.num_features)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(batch_norm(input) [+ residual])``; ``residual`` has ``input``'s shape, dtype and
        device."""
        # Parameters and buffers are read from their dicts: Module.__getattr__ costs a call each.
        # A pruned or parametrized weight (torch.nn.utils.prune, .parametrize) is an attribute
        # computed elsewhere, a new tensor each call: then everything is read as torch's module
        # reads it, and checked every call (the fast path remembers registered tensors only).
        params, buffers = self._parameters, self._buffers
        registered = True
        try:
            weight, bias = params["weight"], params["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            counter = buffers["num_batches_tracked"]
        except KeyError:
            weight, bias, running_mean, running_var = _attributes(self)
            counter, registered = self.num_batches_tracked, False
        calls = self._eager_calls  # None until a call ran on the Triton kernels
        if calls is not None and residual is None and registered:
            key = eager.signature(self, input)
            call = None if key is None else calls.get(key)
            if call is not None:  # the fast path (tritonbn.eager): no check, no decision
                momentum = _batch_momentum(call.momentum, counter if call.counts else None)
                y = eager.run(call, input, weight, bias, running_mean, running_var, counter, momentum)
                if y is not None:
                    return y
        if is_fx_proxy(input):
            return fx_leaf_call(self, input, residual)
        self._check_input_dim(input)
        training, activation, eps = self.training, self.activation, self.eps
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        counted = counter if training and self.track_running_stats else None  # the batch is counted
        momentum = _batch_momentum(momentum_value(self.momentum), counted)
        # Inside a torch.func transform, count first, as torch's module does: a transform that
        # refuses to mutate the captured counter then raises before the statistics change.
        count_first = (
            counted is not None and not torch.compiler.is_compiling() and is_functorch_wrapped_tensor(input)
        )
        if count_first:
            counted.add_(1)
        if activation is not None:
            check_activation(activation, self.negative_slope)
        memory_efficient = self.memory_efficient
        if residual is not None or memory_efficient:
            check_fusion(input, residual, activation, self.negative_slope, memory_efficient)
        # The dispatcher may refuse the call too: ask it before anything changes.
        plan = select_plan(input, bn_training)
        if plan.backend == "torch":
            y = torch_fallback(
                input,
                running_mean,
                running_var,
                weight,
                bias,
                bn_training,
                momentum,
                eps,
                activation,
                self.negative_slope,
                residual=residual,
                memory_efficient=memory_efficient,
            )
        else:
            check_batch_norm_args(input, running_mean, running_var, weight, bias, bn_training, momentum, eps)
            y = run_checked(
                input,
                running_mean,
                running_var,
                weight,
                bias,
                bn_training,
                momentum,
                eps,
                activation=activation,
                negative_slope=self.negative_slope,
                plan=plan,
                residual=residual,
                memory_efficient=memory_efficient,
            )
            if plan.backend == "triton" and residual is None and registered:
                key = eager.signature(self, input)
                if key is not None:
                    self._remember(
                        key, plan, input, weight, bias, running_mean, running_var, bn_training, counted
                    )
        # Counted once the call has succeeded: a refused call leaves the module as it was.
        if counted is not None and not count_first:
            counted.add_(1)
        return y

    def _remember(
        self,
        key: tuple[object, ...],
        plan: Plan,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        bn_training: bool,
        counter: torch.Tensor | None,
    ) -> None:
        """Remember a call that the checks accepted and the Triton kernels ran as they are (no
        copy of the input or of a per-channel tensor), so that the same call skips them next
        time (``tritonbn.eager``). ``counter`` is num_batches_tracked when the call counts the
        batch, else None."""
        # Plain numbers only: a 0-d tensor momentum may change in place, unseen by the signature.
        fixed_options = type(self.eps) in (int, float) and (
            self.momentum is None or type(self.momentum) in (int, float)
        )
        if (
            plan.copies_input
            or not fixed_options
            or not all(t is None or t.is_contiguous() for t in (weight, bias, running_mean, running_var))
        ):
            return
        from . import kernels

        # A call that counts the batch gives the counter to the kernels, which add 1.
        site = kernels.forward_site(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            training=bn_training,
            plan=plan.kernel,
            sm_count=sm_count(input.device),
            activation=self.activation,
            counter=counter,
        )
        call = eager.EagerCall(
            site,
            training=bn_training,
            running=running_mean is not None,
            eps=float(self.eps),
            activation=self.activation,
            slope=float(self.negative_slope),
            momentum=None if self.momentum is None else float(self.momentum),
            counts=counter is not None,
            tensors=eager.identity(weight, bias, *_statistics_buffers(self)),
            x_layout=eager.layout(input),
        )
        if self._eager_calls is None:
            self._eager_calls = eager.EagerCalls()
        self._eager_calls.remember(key, call)

    def extra_repr(self) -> str:
        text = super().extra_repr() + activation_repr(self.activation, self.negative_slope)
        return text + (", memory_efficient=True" if self.memory_efficient else "")


def _statistics_buffers(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The module's running_mean, running_var and num_batches_tracked, whether a call passes them
    or not."""
    buffers = module._buffers
    return buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]


def _attributes(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """weight, bias, running_mean and running_var as attributes, wherever they live."""
    return module.weight, module.bias, module.running_mean, module.running_var


def _batch_momentum(momentum: float | None, counter: torch.Tensor | None) -> float:
    """``momentum``; for a cumulative average (None) the factor of the batch about to be counted in
    ``counter`` (num_batches_tracked; None when the call counts no batch: 0.0)."""
    if momentum is not None:
        return momentum
    return 1.0 / (float(counter) + 1.0) if counter is not None else 0.0


def _frozen_dtype(dtype: torch.dtype, buffers: tuple[torch.Tensor, ...]) -> torch.dtype | None:
    """None where batch_norm takes ``dtype`` input with these buffers as they are (the same dtype,
    or float32 buffers for half input); else the dtype torchvision's FrozenBatchNorm2d computes
    in, the promotion of the input's and the buffers' dtypes."""
    kinds = {t.dtype for t in buffers}
    if kinds == {dtype} or (kinds == {torch.float32} and dtype in (torch.float16, torch.bfloat16)):
        return None
    for kind in kinds:
        dtype = torch.promote_types(dtype, kind)
    return dtype


def is_fx_proxy(input: object) -> bool:
    """Whether ``input`` is a ``torch.fx`` Proxy: the module is being symbolically traced."""
    return not isinstance(input, torch.Tensor) and isinstance(input, torch.fx.Proxy)


def fx_leaf_call(module: nn.Module, input: torch.fx.Proxy, residual: object = None) -> torch.fx.Proxy:
    """The module's call as one ``call_module`` node of the graph ``torch.fx`` is tracing, the
    node torch.nn's BatchNorm gets (the default tracer keeps torch.nn modules whole): the graph
    then calls the module itself, on tensors. ``residual`` is passed on when given."""
    tracer = input.tracer
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


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


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """Drop-in ``torch.nn.BatchNorm3d`` over (N, C, D, H, W) input, on tritonbn.

    ``channels_last_3d`` input gives ``channels_last_3d`` output, as torch's does.
    """

    _expected_dims = (5,)
    _expected_shape = "5D (N, C, D, H, W)"


class _TritonLazyBatchNorm:
    """The constructor of tritonbn's Lazy BatchNorms: torch's Lazy one, plus ``activation``.

    The module is a ``torch.nn.LazyBatchNormXd`` until its first input: that call infers
    ``num_features`` from ``input.shape[1]``, materializes the parameters and buffers, makes the
    module the tritonbn class ``cls_to_become`` and runs it, so even the first call (and the
    fused activation) runs on tritonbn.
    """

    def __init__(
        self,
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
        memory_efficient: bool = False,
    ) -> None:
        check_module_options(0, eps, momentum, lazy=True)
        check_activation(activation, negative_slope)
        check_memory_efficient(memory_efficient, activation, negative_slope)
        kwargs = batchnorm_bias_kwargs(type(self).__name__, bias)  # refuses bias=False where torch lacks it
        nn.modules.batchnorm._LazyNormBase.__init__(
            self, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.memory_efficient = memory_efficient

    def initialize_parameters(self, input: torch.Tensor) -> None:
        """Materialize from ``input`` (torch's), and set ``num_features`` also where a loaded
        state_dict materialized the tensors first (torch leaves it 0 then)."""
        super().initialize_parameters(input)  # type: ignore[misc]
        if self.num_features == 0:
            sized = [t for t in (self.weight, self.running_mean) if t is not None]
            self.num_features = sized[0].shape[0] if sized else input.shape[1]


class LazyBatchNorm1d(_TritonLazyBatchNorm, nn.LazyBatchNorm1d, _TritonBatchNorm):
    """Drop-in ``torch.nn.LazyBatchNorm1d``: becomes a ``tritonbn.BatchNorm1d`` at its first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_TritonLazyBatchNorm, nn.LazyBatchNorm2d, _TritonBatchNorm):
    """Drop-in ``torch.nn.LazyBatchNorm2d``: becomes a ``tritonbn.BatchNorm2d`` at its first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_TritonLazyBatchNorm, nn.LazyBatchNorm3d, _TritonBatchNorm):
    """Drop-in ``torch.nn.LazyBatchNorm3d``: becomes a ``tritonbn.BatchNorm3d`` at its first input."""

    cls_to_become = BatchNorm3d


class FrozenBatchNorm2d(nn.Module):
    """Drop-in ``torchvision.ops.misc.FrozenBatchNorm2d``: BatchNorm2d with fixed statistics and
    affine parameters, on tritonbn's eval plan.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers (the state_dict keys of
    torchvision's; a ``num_batches_tracked`` entry in a loaded state_dict is dropped, as there), so
    nothing here is trained: ``y = (x - running_mean)·rsqrt(running_var + eps)·weight + bias`` in
    training and eval mode alike, differentiable in ``x`` only. Input and buffers of different
    dtypes compute in their promotion, as torchvision's do, except that float16 or bfloat16 input
    with float32 buffers gives output of the input's dtype (torchvision's: float32), as
    ``BatchNorm2d`` does. ``activation`` (as on ``BatchNorm2d``) may follow the normalization.
    torchvision is not needed to use it.
    """

    _expected_dims = (4,)
    _expected_shape = "4D (N, C, H, W)"
    # Class defaults: a torchvision module whose class ``convert`` swapped never ran __init__.
    activation: str | None = None
    negative_slope: float = 0.01

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        num_features = check_module_options(num_features, eps, None)
        check_activation(activation, negative_slope)
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.activation = activation
        self.negative_slope = float(negative_slope)

    @property
    def num_features(self) -> int:
        """The number of channels, from the buffers (torchvision's keeps no such attribute)."""
        return self.weight.shape[0]

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this on every submodule first: fail there with the way out."""
        raise script_unsupported(self)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # torch BatchNorm checkpoints carry a counter that a frozen module has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(frozen_batch_norm(input) [+ residual])``."""
        if is_fx_proxy(input):
            return fx_leaf_call(self, input, residual)
        running_mean, running_var = self.running_mean, self.running_var
        check_module_input(self, input, self._expected_dims, self._expected_shape, running_mean.shape[0])
        weight, bias, eps = self.weight, self.bias, self.eps
        buffers = (weight, bias, running_mean, running_var)
        common = _frozen_dtype(input.dtype, buffers)
        if common is not None:  # torchvision's type promotion, where batch_norm's rule refuses
            input = input.to(common)
            weight, bias, running_mean, running_var = (t.to(common) for t in buffers)
            residual = None if residual is None else residual.to(common)
        check_batch_norm_args(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        activation = self.activation
        if activation is not None:
            check_activation(activation, self.negative_slope)
        if residual is not None:
            check_fusion(input, residual, activation, self.negative_slope, False)
        return run_checked(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            False,
            0.0,
            eps,
            activation=activation,
            negative_slope=self.negative_slope,
            residual=residual,
        )

    def __repr__(self) -> str:
        extra = activation_repr(self.activation, self.negative_slope)
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps}{extra})"


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
        memory_efficient: bool = False,
    ) -> None:
        if num_dims not in (2, 4):
            raise ValueError(f"'num_dims' must be 2 or 4, got {num_dims!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            activation=activation,
            negative_slope=negative_slope,
            memory_efficient=memory_efficient,
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
