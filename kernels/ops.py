"""The kernels' entry points: training and eval forward and backward for a plan of ``KERNEL_PLANS``.

Each function takes tensors whose layout ``layout.describe`` accepts (the dispatcher copies any other),
looks up the launch site's geometry and launches; it never reads a module, an option or an
environment variable. A launch site is everything the launches depend on — plan, shape, strides,
dtypes, which optional tensors are present, their pointer alignment, activation, the gradients
asked for — so a training loop computes each layer's geometry once and, after the first call,
launches through ``launch.Launcher``'s records. ``activation`` (None or a name of
``activation.ACTIVATIONS``, with leaky_relu's ``negative_slope``) is applied to the normalized
output in the forward and differentiated, from the saved input, in the backward. An optional
``residual`` (x's shape and strides) is added before the activation, y = act(z + residual); the
backward then returns its gradient too when ``need_residual``. ``from_output`` selects the
memory-efficient backward, which reads the forward's output y instead of x (invertible
activations only, the weight kept away from zero by the caller).

``plan`` is a plan name of ``KERNEL_PLANS`` or a ``plans.plan_token`` (the name with tunables from a
tuning table, ``"split-welford@tile=8192"``); the eval entry points take one too (``"eval"`` by
default). The tunables are part of every launch-site key.
"""

from __future__ import annotations

import functools

import torch

from .activation import activation_code
from .backward import backward_dx, backward_sums
from .fused_small import fused_backward, fused_forward
from .launch import tensors_key
from .layout import describe_strides
from .normalization import FOLDED, RUNNING, SAVED, Normalization
from .normalize import normalize
from .plans import DEFAULT_TUNABLES, KERNEL_PLANS, Geometry, KernelPlan, Tunables, geometry, parse_plan
from .stats import batch_statistics

__all__ = ["backward_eval", "backward_train", "forward_eval", "forward_train", "saved_rows"]


@functools.lru_cache(maxsize=4096)
def _geometries(
    plan: KernelPlan,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    sm_count: int,
    force_int64: bool,
    tunables: Tunables = DEFAULT_TUNABLES,
) -> tuple[Geometry, Geometry]:
    """(reduction geometry, elementwise geometry) of ``plan`` with ``tunables`` on a tensor of
    this shape."""
    layout = describe_strides(shape, strides)
    if layout.name == "strided":
        raise ValueError("the kernels need a dense input whose spatial dims collapse; copy it first")
    channel_major = plan.channel_major(layout)
    if plan.single_tile:
        geo = geometry(
            layout,
            channel_major=channel_major,
            sm_count=sm_count,
            single_tile=True,
            force_int64=force_int64,
            tunables=tunables,
        )
        return geo, geo
    reduction = geometry(
        layout, channel_major=channel_major, sm_count=sm_count, force_int64=force_int64, tunables=tunables
    )
    elementwise = geometry(
        layout,
        channel_major=channel_major,
        sm_count=sm_count,
        programs_per_sm=tunables.elementwise_programs_per_sm,
        force_int64=force_int64,
        tunables=tunables,
    )
    return reduction, elementwise


def _site(
    x: torch.Tensor,
    plan: KernelPlan,
    sm_count: int,
    force_int64: bool,
    *flags: object,
    tunables: Tunables = DEFAULT_TUNABLES,
) -> tuple[tuple[object, ...], Geometry, Geometry]:
    """(launch-site key, reduction geometry, elementwise geometry) of a call on ``x``. The key holds
    everything the geometry depends on — the SM count sets the split, the tunables block sizes and
    warps — since a launch record replays its first call's grid."""
    shape, strides = tuple(x.shape), x.stride()
    if tunables is DEFAULT_TUNABLES:  # the common case pays no hash of the tunables
        reduction, elementwise = _geometries(plan, shape, strides, sm_count, force_int64)
        key = (plan.name, x.device, x.dtype, shape, strides, sm_count, force_int64, *flags)
    else:
        reduction, elementwise = _geometries(plan, shape, strides, sm_count, force_int64, tunables)
        key = (plan.name, tunables, x.device, x.dtype, shape, strides, sm_count, force_int64, *flags)
    return key, reduction, elementwise


def saved_rows(plan: str) -> int:
    """Rows of the per-channel fp32 ``save`` that ``forward_train`` returns for ``plan``: mean and
    invstd, plus the folded scale and shift on the split plans."""
    return parse_plan(plan)[0].saved_rows


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
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward: (y, save) with save[0] = mean and save[1] = invstd (fp32, per channel).

    y = act((x − mean)·invstd·weight + bias [+ residual]) with the batch statistics; then updates
    the running statistics in place. ``residual`` must have x's shape and strides.
    """
    kernel_plan, tunables = parse_plan(plan)
    code = activation_code(activation)
    key, geo, out_geo = _site(
        x,
        kernel_plan,
        sm_count,
        force_int64,
        "train",
        code,
        tensors_key(x, weight, bias, running_mean, running_var, residual),
        tunables=tunables,
    )
    if kernel_plan.single_tile:
        return fused_forward(
            x,
            geo,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            activation=code,
            slope=negative_slope,
            key=key,
            residual=residual,
        )
    # save[2], save[3] = invstd·weight, bias: folded before the running statistics change.
    save = batch_statistics(x, geo, weight, bias, running_mean, running_var, momentum, eps, key=key)
    folded = Normalization(save, None, None, None, FOLDED, 0.0, code, negative_slope)
    return normalize(x, out_geo, folded, key=key, residual=residual), save


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
    plan: str = "eval",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eval forward in one launch: y = act((x − running_mean)/sqrt(running_var + eps)·γ + β
    [+ residual]). ``plan`` is ``"eval"`` or an eval token with tunables."""
    code = activation_code(activation)
    _, tunables = parse_plan(plan)  # eval always runs the eval plan, with the token's tunables
    key, _, geo = _site(
        x,
        KERNEL_PLANS["eval"],
        sm_count,
        force_int64,
        "eval",
        code,
        tensors_key(x, weight, bias, running_mean, running_var, residual),
        tunables=tunables,
    )
    norm = Normalization(running_mean, running_var, weight, bias, RUNNING, eps, code, negative_slope)
    return normalize(x, geo, norm, key=key, residual=residual)


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
    residual: torch.Tensor | None = None,
    need_residual: bool = False,
    from_output: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Training backward: (dx, dγ, dβ) for the entries of ``needs`` that are True, and a fourth
    entry, the residual's gradient dy·act'(z + residual), when ``need_residual``.

    ``dy`` must have ``x``'s strides; ``save`` is what ``forward_train`` returned. With an
    activation, ``bias`` and ``residual`` must be the forward's: the backward recomputes the
    activation's input from ``x``. With ``from_output``, ``x`` is the forward's output y (no
    residual; activation None or leaky_relu with a positive slope; no zero in ``weight``).
    """
    need_input, need_weight, need_bias = needs
    kernel_plan, tunables = parse_plan(plan)
    code = activation_code(activation)
    key, geo, out_geo = _site(
        x,
        kernel_plan,
        sm_count,
        force_int64,
        "backward",
        code,
        needs,
        need_residual,
        from_output,
        tensors_key(dy, x, weight, bias, residual),
        tunables=tunables,
    )
    norm = Normalization(save, None, weight, bias, SAVED, 0.0, code, negative_slope)
    fused = {"residual": residual, "from_output": from_output}
    if kernel_plan.single_tile:
        *grads, dres = fused_backward(
            dy,
            x,
            geo,
            norm,
            need_input,
            need_weight,
            need_bias,
            key=key,
            need_residual=need_residual,
            **fused,
        )
        return (*grads, dres) if need_residual else tuple(grads)
    grad_weight, grad_bias, coef = backward_sums(
        dy,
        x,
        geo,
        norm,
        need_weight=need_weight,
        need_bias=need_bias,
        need_coef=need_input,
        key=key,
        **fused,
    )
    dx = dres = None
    if need_input or need_residual:
        dx, dres = backward_dx(
            dy, x, out_geo, norm, coef, key=key, need_input=need_input, need_residual=need_residual, **fused
        )
    return (dx, grad_weight, grad_bias, dres) if need_residual else (dx, grad_weight, grad_bias)


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
    plan: str = "eval",
    residual: torch.Tensor | None = None,
    need_residual: bool = False,
    from_output: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Eval backward with the running statistics held constant: with dz = dy·act'(z) (z
    recomputed from ``x``; dz = dy without activation), dx = dz·γ/sqrt(running_var + eps),
    dγ = Σ dz·(x − running_mean)/sqrt(running_var + eps), dβ = Σ dz. ``plan`` is ``"eval"`` or
    an eval token with tunables. ``residual``, ``need_residual`` and ``from_output`` as in
    ``backward_train`` (a fourth entry, dz, when ``need_residual``).
    """
    need_input, need_weight, need_bias = needs
    code = activation_code(activation)
    _, tunables = parse_plan(plan)
    key, geo, out_geo = _site(
        x,
        KERNEL_PLANS["eval"],
        sm_count,
        force_int64,
        "eval-backward",
        code,
        needs,
        need_residual,
        from_output,
        tensors_key(dy, x, weight, bias, running_mean, running_var, residual),
        tunables=tunables,
    )
    norm = Normalization(running_mean, running_var, weight, bias, RUNNING, eps, code, negative_slope)
    fused = {"residual": residual, "from_output": from_output}
    grad_weight = grad_bias = dx = dres = None
    if need_weight or need_bias:
        grad_weight, grad_bias, _ = backward_sums(
            dy,
            x,
            geo,
            norm,
            need_weight=need_weight,
            need_bias=need_bias,
            need_coef=False,
            key=key,
            **fused,
        )
    if need_input or need_residual:
        dx, dres = backward_dx(
            dy, x, out_geo, norm, None, key=key, need_input=need_input, need_residual=need_residual, **fused
        )
    return (dx, grad_weight, grad_bias, dres) if need_residual else (dx, grad_weight, grad_bias)
