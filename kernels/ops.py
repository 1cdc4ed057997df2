"""The kernels' entry points: training and eval forward and backward for a named plan.

Each function takes tensors whose layout ``describe`` accepts (the dispatcher copies any other),
picks the tiling and launches; it never reads a module, an option or an environment variable.
``activation`` (None or a name of ``activation.ACTIVATIONS``, with leaky_relu's ``negative_slope``)
is applied to the normalized output in the forward and differentiated, from the saved input, in
the backward.
"""

from __future__ import annotations

import torch

from .activation import activation_code
from .backward import backward_dx, backward_sums
from .fused_small import fused_backward, fused_forward
from .layout import describe
from .normalize import Normalization, normalize
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


def saved_rows(plan: str) -> int:
    """Rows of the per-channel fp32 ``save`` that ``forward_train`` returns for ``plan``: mean and
    invstd, plus the folded scale and shift on the split plans."""
    return 2 if plan == "fused-small" else 4


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
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward: (y, save) with save[0] = mean and save[1] = invstd (fp32, per channel).

    y = act((x − mean)·invstd·weight + bias) with the batch statistics; then updates the running
    statistics in place.
    """
    code = activation_code(activation)
    geo = _geometry(x, plan, sm_count, force_int64=force_int64)
    if plan == "fused-small":
        return fused_forward(x, geo, weight, bias, running_mean, running_var, momentum, eps,
                             activation=code, slope=negative_slope)
    # save[2], save[3] = invstd·weight, bias: folded before the running statistics change.
    save = batch_statistics(x, geo, weight, bias, running_mean, running_var, momentum, eps)
    out_geo = _geometry(x, plan, sm_count, elementwise=True, force_int64=force_int64)
    folded = Normalization(save[0], save[2], None, save[3], activation=code, slope=negative_slope)
    return normalize(x, out_geo, folded), save


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
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Eval forward in one launch: y = act((x − running_mean)/sqrt(running_var + eps)·γ + β)."""
    geo = _geometry(x, "eval", sm_count, elementwise=True, force_int64=force_int64)
    norm = Normalization(running_mean, running_var, weight, bias, invstd_is_var=True, eps=eps,
                         activation=activation_code(activation), slope=negative_slope)
    return normalize(x, geo, norm)


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
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Training backward: (dx, dγ, dβ) for the entries of ``needs`` that are True.

    ``dy`` must have ``x``'s strides; ``save`` is what ``forward_train`` returned. With an
    activation, ``bias`` must be the forward's: the backward recomputes its input z from ``x``.
    """
    need_input, need_weight, need_bias = needs
    norm = Normalization(save[0], save[1], weight, bias, activation=activation_code(activation),
                         slope=negative_slope)
    geo = _geometry(x, plan, sm_count, force_int64=force_int64)
    if plan == "fused-small":
        return fused_backward(dy, x, geo, norm, need_input, need_weight, need_bias)
    grad_weight, grad_bias, coef = backward_sums(
        dy, x, geo, norm, need_weight=need_weight, need_bias=need_bias, need_coef=need_input
    )
    dx = None
    if need_input:
        out_geo = _geometry(x, plan, sm_count, elementwise=True, force_int64=force_int64)
        dx = backward_dx(dy, x, out_geo, norm, coef)
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
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Eval backward with the running statistics held constant: with dz = dy·act'(z) (z
    recomputed from ``x``; dz = dy without activation), dx = dz·γ/sqrt(running_var + eps),
    dγ = Σ dz·(x − running_mean)/sqrt(running_var + eps), dβ = Σ dz.
    """
    need_input, need_weight, need_bias = needs
    norm = Normalization(running_mean, running_var, weight, bias, invstd_is_var=True, eps=eps,
                         activation=activation_code(activation), slope=negative_slope)
    grad_weight = grad_bias = dx = None
    if need_weight or need_bias:
        geo = _geometry(x, "eval", sm_count, force_int64=force_int64)
        grad_weight, grad_bias, _ = backward_sums(
            dy, x, geo, norm, need_weight=need_weight, need_bias=need_bias, need_coef=False
        )
    if need_input:
        geo = _geometry(x, "eval", sm_count, elementwise=True, force_int64=force_int64)
        dx = backward_dx(dy, x, geo, norm, None)
    return dx, grad_weight, grad_bias
