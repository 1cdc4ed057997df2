"""The kernels' entry points: training and eval forward and backward for a named plan.

Each function takes tensors whose layout ``describe`` accepts (the dispatcher copies any other),
picks the tiling and launches; it never reads a module, an option or an environment variable.
"""

from __future__ import annotations

import torch

from .backward import backward_dx, backward_sums
from .fused_small import fused_backward, fused_forward
from .layout import describe
from .normalize import normalize
from .plans import ELEMENTWISE_PROGRAMS_PER_SM, Geometry, column_tiling, geometry
from .stats import batch_statistics


def _geometry(x: torch.Tensor, plan: str, sm_count: int, *, elementwise: bool = False,
              force_int64: bool = False) -> Geometry:
    layout = describe(x)
    if layout.name == "strided":
        raise ValueError("the kernels need a dense input whose spatial dims collapse; copy it first")
    if plan == "fused-small":
        return geometry(layout, channel_major=not column_tiling(layout), sm_count=sm_count,
                        single_tile=True, force_int64=force_int64)
    if plan == "column-tiled":
        channel_major = False
    elif plan == "split-welford":
        channel_major = True
    elif plan == "eval":
        channel_major = not column_tiling(layout)
    else:
        raise ValueError(f"unknown kernel plan {plan!r}")
    kwargs = {"programs_per_sm": ELEMENTWISE_PROGRAMS_PER_SM} if elementwise else {}
    return geometry(layout, channel_major=channel_major, sm_count=sm_count,
                    force_int64=force_int64, **kwargs)


def forward_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    *,
    plan: str,
    sm_count: int,
    force_int64: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward: (y, save) with save[0] = mean and save[1] = invstd (fp32, per channel).

    Normalizes with the batch statistics, then updates the running statistics in place.
    """
    if plan == "fused-small":
        geo = _geometry(x, plan, sm_count, force_int64=force_int64)
        return fused_forward(x, geo, weight, bias, running_mean, running_var, momentum, eps)
    geo = _geometry(x, plan, sm_count, force_int64=force_int64)
    save = batch_statistics(x, geo, weight, bias, running_mean, running_var, momentum, eps)
    out_geo = _geometry(x, plan, sm_count, elementwise=True, force_int64=force_int64)
    y = normalize(x, torch.empty_like(x), out_geo, mean=save[0], scale=save[2],
                  scale_is_var=False, weight=None, bias=save[3])
    return y, save


def forward_eval(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    *,
    sm_count: int,
    force_int64: bool = False,
) -> torch.Tensor:
    """Eval forward in one launch: y = (x − running_mean)/sqrt(running_var + eps)·γ + β."""
    geo = _geometry(x, "eval", sm_count, elementwise=True, force_int64=force_int64)
    return normalize(x, torch.empty_like(x), geo, mean=running_mean, scale=running_var,
                     scale_is_var=True, weight=weight, bias=bias, eps=eps)


def backward_train(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    save: torch.Tensor,
    needs: tuple[bool, bool, bool],
    *,
    plan: str,
    sm_count: int,
    force_int64: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Training backward: (dx, dγ, dβ) for the entries of ``needs`` that are True.

    ``dy`` must have ``x``'s strides; ``save`` is what ``forward_train`` returned.
    """
    need_input, need_weight, need_bias = needs
    if plan == "fused-small":
        geo = _geometry(x, plan, sm_count, force_int64=force_int64)
        return fused_backward(dy, x, geo, save, weight, need_input, need_weight, need_bias)
    geo = _geometry(x, plan, sm_count, force_int64=force_int64)
    grad_weight, grad_bias, coef = backward_sums(
        dy, x, geo, mean=save[0], invstd=save[1], invstd_is_var=False, eps=0.0, weight=weight,
        need_weight=need_weight, need_bias=need_bias, need_coef=need_input,
    )
    dx = None
    if need_input:
        out_geo = _geometry(x, plan, sm_count, elementwise=True, force_int64=force_int64)
        dx = backward_dx(dy, x, out_geo, mean=save[0], coef=coef)
    return dx, grad_weight, grad_bias


def backward_eval(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    needs: tuple[bool, bool, bool],
    *,
    sm_count: int,
    force_int64: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Eval backward with the running statistics: dx = dy·γ/sqrt(running_var + eps),
    dγ = Σ dy·(x − running_mean)/sqrt(running_var + eps), dβ = Σ dy.
    """
    need_input, need_weight, need_bias = needs
    grad_weight = grad_bias = dx = None
    if need_weight or need_bias:
        geo = _geometry(x, "eval", sm_count, force_int64=force_int64)
        grad_weight, grad_bias, _ = backward_sums(
            dy, x, geo, mean=running_mean, invstd=running_var, invstd_is_var=True, eps=eps,
            weight=weight, need_weight=need_weight, need_bias=need_bias, need_coef=False,
        )
    if need_input:
        geo = _geometry(x, "eval", sm_count, elementwise=True, force_int64=force_int64)
        dx = normalize(dy, torch.empty_like(x), geo, mean=None, scale=running_var,
                       scale_is_var=True, weight=weight, bias=None, eps=eps)
    return dx, grad_weight, grad_bias
