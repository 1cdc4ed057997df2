"""``tritonbn.SyncBatchNorm``: batch statistics shared across the ranks of a torch.distributed group.

Training with more than one rank: every rank reduces its own slice of the batch to per-channel
(count, mean, M2), the ranks all-gather those triples and each merges them with Chan's formula in
rank order, so every rank normalizes with the same global statistics, bit for bit. The backward
all-reduces the two per-channel sums the input gradient needs. Unlike ``torch.nn.SyncBatchNorm``
this runs on CPU tensors with the gloo backend as well as on CUDA with NCCL. Eval mode, a group of
one rank, or no initialized process group: the module is a plain ``tritonbn.batch_norm`` call.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.lazy import LazyModuleMixin

from ._checks import (
    check_activation,
    check_batch_norm_args,
    check_module_input,
    check_module_options,
    momentum_value,
)
from ._compat import batchnorm_bias_kwargs
from .dispatch import select_plan
from .functional import check_fusion, run_checked, torch_activation
from .modules import activation_repr, fx_leaf_call, is_fx_proxy, script_unsupported

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

# Like torch's SyncBatchNorm: any input of at least 2 dimensions (N, C, *).
_SUPPORTED_DIMS = range(2, sys.maxsize)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 input keeps float64; every other dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduced_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one (dim 1)."""
    return [0, *range(2, x.dim())]


def _per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) vector shaped to broadcast against ``x`` along dim 1."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


@dataclass(frozen=True)
class GlobalMoments:
    """Per-channel statistics of the whole distributed batch (float64, identical on every rank)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor


def local_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) per channel of this rank's ``x``, in float32 (float64 for float64 ``x``).

    M2 = Σ(x − mean)² comes from a variance computed around the mean (never E[x²] − E[x]²). An
    empty ``x`` gives count 0 and zero mean and M2, which the merge then ignores.
    """
    acc = _accumulation_dtype(x.dtype)
    channels = x.shape[1]
    count = x.numel() // channels
    if count == 0:
        zeros = torch.zeros(channels, dtype=acc, device=x.device)
        return 0, zeros, zeros.clone()
    var, mean = torch.var_mean(x.to(acc), dim=_reduced_dims(x), correction=0)
    return count, mean, var * count


def gather_global_moments(x: torch.Tensor, group: Any, world_size: int) -> GlobalMoments:
    """Merge every rank's (count, mean, M2) for ``x``'s channels into the whole batch's.

    A collective: every rank of ``group`` must call it, each with its own (possibly empty) slice.
    The triples travel as float64, so counts stay exact and float32 statistics lose nothing; the
    merge runs in rank order, so all ranks get the same bits.
    """
    count, mean, m2 = local_moments(x)
    channels = x.shape[1]
    count_entry = torch.full((1,), count, dtype=torch.float64, device=x.device)
    payload = torch.cat([count_entry, mean.to(torch.float64), m2.to(torch.float64)])
    gathered = [torch.empty_like(payload) for _ in range(world_size)]
    dist.all_gather(gathered, payload, group=group)
    counts = [int(c) for c in torch.stack([p[0] for p in gathered]).tolist()]

    total = 0
    merged_mean = torch.zeros(channels, dtype=torch.float64, device=x.device)
    merged_m2 = torch.zeros_like(merged_mean)
    for rank_count, rank_payload in zip(counts, gathered, strict=True):
        if rank_count == 0:
            continue
        rank_mean = rank_payload[1 : 1 + channels]
        rank_m2 = rank_payload[1 + channels :]
        # Chan et al.: with n = n_a + n_b and δ = mean_b − mean_a,
        #   mean = mean_a + δ·n_b/n,   M2 = M2_a + M2_b + δ²·n_a·n_b/n.
        combined = total + rank_count
        delta = rank_mean - merged_mean
        merged_mean = merged_mean + delta * (rank_count / combined)
        merged_m2 = merged_m2 + rank_m2 + delta.square() * (total * rank_count / combined)
        total = combined
    return GlobalMoments(total, merged_mean, merged_m2)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x − mean)·invstd·γ + β with global ``mean``/``invstd``; the backward syncs its sums.

    The gradients of γ and β are this rank's own sums, Σ dy·x̂ and Σ dy over the local slice, like
    ``torch.nn.SyncBatchNorm``'s: summed over the ranks they are the gradients of the summed loss,
    and DistributedDataParallel's averaging then treats them like every other parameter's. A rank
    with an empty slice gets zeros (torch leaves them None), so every rank has a gradient to reduce.
    As in torch, the all-reduce runs only when the input needs a gradient, which every rank of the
    group must agree on.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        count: int,
        group: Any,
    ) -> torch.Tensor:
        acc = mean.dtype
        x_hat = (input.to(acc) - _per_channel(mean, input)) * _per_channel(invstd, input)
        y = x_hat
        if weight is not None:
            y = y * _per_channel(weight.to(acc), input)
        if bias is not None:
            y = y + _per_channel(bias.to(acc), input)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.count = count
        ctx.group = group
        return y.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        acc = mean.dtype
        dims = _reduced_dims(input)
        dy = grad_output.to(acc)
        x_hat = (input.to(acc) - _per_channel(mean, input)) * _per_channel(invstd, input)
        # Sums over an empty local slice are zeros: such a rank still joins the all-reduce.
        sum_dy = dy.sum(dim=dims)
        sum_dy_xhat = (dy * x_hat).sum(dim=dims)

        grad_input = grad_weight = grad_bias = None
        if needs_input:
            totals = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=ctx.group)
            # With means over the whole distributed batch (count values per channel):
            #   dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂)).
            scale = invstd if weight is None else invstd * weight.to(acc)
            mean_dy = totals[0] / ctx.count
            mean_dy_xhat = totals[1] / ctx.count
            grad_input = (
                (dy - _per_channel(mean_dy, input) - x_hat * _per_channel(mean_dy_xhat, input))
                * _per_channel(scale, input)
            ).to(input.dtype)
        if needs_weight:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if needs_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm`` over (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)
    input that also runs on CPU tensors (gloo) besides CUDA (NCCL).

    Same constructor, attributes and state_dict as torch's, but not a subclass of it:
    DistributedDataParallel refuses every ``torch.nn.SyncBatchNorm`` in a CPU model.

    Training in a group of more than one rank normalizes with the statistics of the batch
    concatenated over the group's ranks (their slices may differ in size and may be empty), and
    updates the running statistics with its unbiased variance, identically on every rank. Each
    rank's weight/bias gradients are its local share, as with torch's SyncBatchNorm; summed (or
    averaged by DistributedDataParallel) over the ranks they give the full batch's gradients.
    ``activation`` (as on ``tritonbn.BatchNorm2d``) follows the normalization in both paths.
    Otherwise (eval, one rank, no process group) it is ``tritonbn.batch_norm``. Bad input raises on
    the calling rank before any state changes.

    Args:
        num_features (int): C, the channels of the input.
        eps (float): added to the variance for numerical stability. Default: 1e-5.
        momentum (float, optional): the running statistics' update factor; None for a cumulative
            average. Default: 0.1.
        affine (bool): learnable weight and bias. Default: True.
        track_running_stats (bool): keep running statistics (used in eval). Default: True.
        process_group (optional): the group whose ranks share statistics; None for the world.
        device, dtype: of the parameters and buffers.
        bias (bool): a learnable bias (keyword; only where the installed torch has the argument).
        activation (str, optional): ``"relu"``, ``"sigmoid"``, ``"leaky_relu"``, ``"silu"`` or
            ``"tanh"`` applied after the normalization (keyword).
        negative_slope (float): leaky_relu's slope (keyword). Default: 0.01.

    Shape:
        - Input: :math:`(N, C)`, :math:`(N, C, L)`, :math:`(N, C, H, W)` or :math:`(N, C, D, H, W)`
        - Output: same shape as input

    Examples::

        >>> # in each process of a torchrun job, after torch.distributed.init_process_group("gloo")
        >>> model = tritonbn.convert_sync_batchnorm(tritonbn.LeNet())
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        num_features = check_module_options(num_features, eps, momentum)
        check_activation(activation, negative_slope)
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
        self.process_group = process_group
        self.activation = activation
        self.negative_slope = negative_slope

    def extra_repr(self) -> str:
        return super().extra_repr() + activation_repr(self.activation, self.negative_slope)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this on every submodule first: fail there with the way out."""
        raise script_unsupported(self)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_module_input(
            self,
            input,
            _SUPPORTED_DIMS,
            "at least 2D (N, C, *)",
            self.num_features,
        )

    def _sync_group(self) -> tuple[Any, int] | None:
        """(group, world size) when training must synchronize, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def _count_batch(self, momentum: float) -> float:
        """Count one training batch; the running-statistics factor for it."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # Cumulative average: the k-th batch gets weight 1/k.
                return 1.0 / float(self.num_batches_tracked)
        return momentum

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(sync_batch_norm(input) [+ residual])``; ``residual`` has ``input``'s shape, dtype
        and device (a fused ResNet block's identity: ``tritonbn.fuse``)."""
        if is_fx_proxy(input):
            return fx_leaf_call(self, input, residual)
        self._check_input_dim(input)
        if residual is not None:
            check_fusion(input, residual, self.activation, self.negative_slope, False)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        momentum = 0.0 if self.momentum is None else momentum_value(self.momentum)
        sync = self._sync_group()
        if sync is None:
            check_batch_norm_args(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                momentum,
                self.eps,
            )
            # The dispatcher may refuse the call too: ask it before counting the batch.
            plan = select_plan(input, bn_training)
            momentum = self._count_batch(momentum)
            return run_checked(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                momentum,
                self.eps,
                activation=self.activation,
                negative_slope=self.negative_slope,
                plan=plan,
                residual=residual,
            )

        group, world_size = sync
        # An empty view carries everything the checks read except the batch size; "more than one
        # value per channel" is a property of the global batch here, checked after the gather.
        check_batch_norm_args(
            input.narrow(0, 0, 0),
            running_mean,
            running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
        )
        moments = gather_global_moments(input, group, world_size)
        if moments.count == 0:
            # Every rank's slice is empty: the same as one process given an empty batch.
            plan = select_plan(input, True)
            momentum = self._count_batch(momentum)
            return run_checked(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                True,
                momentum,
                self.eps,
                activation=self.activation,
                negative_slope=self.negative_slope,
                plan=plan,
                residual=residual,
            )
        if moments.count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"over the {world_size} ranks of the process group (local input size "
                f"{tuple(input.shape)})"
            )
        momentum = self._count_batch(momentum)

        acc = _accumulation_dtype(input.dtype)
        biased_var = moments.m2 / moments.count
        invstd = torch.rsqrt(biased_var + self.eps)
        output = SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            moments.mean.to(acc),
            invstd.to(acc),
            moments.count,
            group,
        )
        # Normalize first, then update: a caller may have aliased the running statistics.
        if running_mean is not None and running_var is not None:
            unbiased_var = moments.m2 / (moments.count - 1)
            with torch.no_grad():
                running_mean.mul_(1.0 - momentum).add_(moments.mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1.0 - momentum).add_(unbiased_var.to(running_var.dtype), alpha=momentum)
        # The synchronized path is plain torch ops: the residual and the activation follow as more.
        if residual is not None:
            output = output + residual
        return torch_activation(output, self.activation, self.negative_slope)


def _new_sync_batchnorm(module: nn.modules.batchnorm._BatchNorm, process_group: Any) -> SyncBatchNorm:
    """A tritonbn SyncBatchNorm holding ``module``'s own parameters, buffers and mode."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    floats = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else None
    dtype = floats[0].dtype if floats else None
    converted = SyncBatchNorm(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
        device=device,
        dtype=dtype,
        activation=getattr(module, "activation", None),
        negative_slope=getattr(module, "negative_slope", 0.01),
    )
    if module.affine:
        converted.weight = module.weight
        converted.bias = module.bias
    converted.running_mean = module.running_mean
    converted.running_var = module.running_var
    converted.num_batches_tracked = module.num_batches_tracked
    converted.training = module.training
    if hasattr(module, "qconfig"):
        converted.qconfig = module.qconfig
    return converted


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` (torch's or tritonbn's BatchNorm1d/2d/3d, and
    SyncBatchNorm) with a ``tritonbn.SyncBatchNorm`` over ``process_group`` (None: the world).

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: returns ``module`` with its BatchNorm
    children replaced, or a new SyncBatchNorm if ``module`` itself is one. A replacement holds the
    original's Parameter objects (an optimizer built before stays valid, requires_grad included),
    its buffers, eps, momentum, fused activation and train/eval mode, so device and dtype are
    unchanged; it takes ``residual=`` like the original, so a ``tritonbn.fuse``d ResNet keeps
    working. ``memory_efficient=True`` is not carried over: the synchronized path keeps its input
    for the backward, as torch's SyncBatchNorm does. (torch's own
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` cannot keep a fused activation: on a model
    with one it raises a ValueError pointing here.)

    Args:
        module (nn.Module): the model, or a BatchNorm layer.
        process_group (optional): the group whose ranks share statistics; None for the world.

    Returns:
        nn.Module: ``module`` with its BatchNorm layers replaced (a new SyncBatchNorm when
        ``module`` is one).

    Raises:
        ValueError: a Lazy BatchNorm in ``module`` has not seen an input yet (its number of
            features is not known); nothing is replaced.

    Examples::

        >>> model = tritonbn.convert_sync_batchnorm(torchvision.models.resnet18())
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm: 'module' must be a torch.nn.Module, got {type(module).__name__}"
        )
    for name, sub in module.named_modules():
        if isinstance(sub, LazyModuleMixin) and sub.has_uninitialized_params():
            where = f"{name!r} ({type(sub).__name__})" if name else type(sub).__name__
            raise ValueError(
                f"convert_sync_batchnorm: the Lazy layer {where} has not seen an input yet, so its "
                "number of features is not known; run one forward pass through the model first"
            )
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group: Any) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _new_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, process_group))
    return module
