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

import itertools

import torch

from .activation import activation_code
from .backward import backward_dx, backward_sums
from .fused_small import fused_backward, fused_forward
from .launch import tensors_key
from .layout import describe_strides
from .normalization import FOLDED, RUNNING, SAVED, Normalization
from .normalize import normalize
from .plans import DEFAULT_TUNABLES, Geometry, KernelPlan, Tunables, geometry, parse_plan
from .stats import batch_statistics

__all__ = ["backward_eval", "backward_train", "forward_eval", "forward_train"]


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


class Site:
    """A launch site: one call signature's launches, prepared once.

    ``id`` is the key of the launchers' records (a small int, cheap to hash on every launch),
    ``key`` what the site was built from: everything the launches depend on — plan, tunables,
    shape, strides, dtypes, pointer alignment, SM count (it sets the split, with the programs of
    each kernel an SM holds: ``occupancy.py``), activation, flags — since a launch record
    replays its first call's grid. The methods run the kernels of the
    site's plan on tensors of that signature; :meth:`derived` gives the site of a launch that
    shares this one's signature plus a few flags (the backward of a forward site).
    """

    __slots__ = ("_derived", "activation", "elementwise", "id", "key", "plan", "reduction")

    def __init__(
        self,
        plan: KernelPlan,
        reduction: Geometry,
        elementwise: Geometry,
        activation: int,
        key: tuple[object, ...],
    ) -> None:
        self.id = next(_site_ids)
        self.plan = plan
        self.reduction = reduction
        self.elementwise = elementwise
        self.activation = activation
        self.key = key
        self._derived: dict[tuple[object, ...], Site] = {}

    def derived(self, flags: tuple[object, ...]) -> Site:
        """The site of this signature with ``flags`` added to its key."""
        site = self._derived.get(flags)
        if site is None:
            site = Site(self.plan, self.reduction, self.elementwise, self.activation, (*self.key, flags))
            self._derived[flags] = site
        return site

    def forward_train(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        slope: float,
        residual: torch.Tensor | None = None,
        counter: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_train`` on this site's launches; ``counter`` (a module's int64
        num_batches_tracked, given to the site too) gets 1 added by the first launch."""
        if self.plan.single_tile:
            return fused_forward(
                x,
                self.reduction,
                weight,
                bias,
                running_mean,
                running_var,
                momentum,
                eps,
                activation=self.activation,
                slope=slope,
                key=self.id,
                residual=residual,
                counter=counter,
            )
        # save[2], save[3] = invstd·weight, bias: folded before the running statistics change.
        save = batch_statistics(
            x,
            self.reduction,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            key=self.id,
            counter=counter,
        )
        folded = Normalization(save, None, None, None, FOLDED, 0.0, self.activation, slope)
        return normalize(x, self.elementwise, folded, key=self.id, residual=residual), save

    def forward_eval(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        slope: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward_eval`` on this site's launches."""
        norm = Normalization(running_mean, running_var, weight, bias, RUNNING, eps, self.activation, slope)
        return normalize(x, self.elementwise, norm, key=self.id, residual=residual)

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        norm: Normalization,
        needs: tuple[bool, bool, bool],
        *,
        residual: torch.Tensor | None = None,
        need_residual: bool = False,
        from_output: bool = False,
    ) -> tuple[torch.Tensor | None, ...]:
        """(dx, dγ, dβ, d residual) on this site's launches, each None unless asked for: the
        training backward when ``norm`` holds a save (SAVED), else the eval one (RUNNING)."""
        need_input, need_weight, need_bias = needs
        training = norm.stats_source != RUNNING
        if training and self.plan.single_tile:
            return fused_backward(
                dy,
                x,
                self.reduction,
                norm,
                need_input,
                need_weight,
                need_bias,
                key=self.id,
                residual=residual,
                need_residual=need_residual,
                from_output=from_output,
            )
        grad_weight = grad_bias = coef = dx = dres = None
        if need_weight or need_bias or (training and need_input):
            grad_weight, grad_bias, coef = backward_sums(
                dy,
                x,
                self.reduction,
                norm,
                need_weight=need_weight,
                need_bias=need_bias,
                need_coef=training and need_input,
                key=self.id,
                residual=residual,
                from_output=from_output,
            )
        if need_input or need_residual:
            dx, dres = backward_dx(
                dy,
                x,
                self.elementwise,
                norm,
                coef,
                key=self.id,
                need_input=need_input,
                need_residual=need_residual,
                residual=residual,
                from_output=from_output,
            )
        return dx, grad_weight, grad_bias, dres


# Sites kept before the oldest is dropped (a model has a few dozen; each batch size adds its own).
MAX_SITES = 4096
_sites: dict[tuple[object, ...], Site] = {}
_site_ids = itertools.count()


def site(
    x: torch.Tensor,
    plan: str,
    sm_count: int,
    force_int64: bool,
    activation: str | None,
    *flags: object,
) -> Site:
    """The launch site of a call on ``x`` with kernel ``plan`` (a name or a token with tunables)
    and ``flags``: the dtypes and alignment of the other tensors, and which launches run."""
    kernel_plan, tunables = parse_plan(plan)
    code = activation_code(activation)
    key = (
        kernel_plan.name,
        None if tunables is DEFAULT_TUNABLES else tunables,
        x.device,
        x.dtype,
        x.shape,
        x.stride(),
        sm_count,
        force_int64,
        code,
        *flags,
    )
    found = _sites.get(key)
    if found is None:
        shape, strides = tuple(x.shape), x.stride()
        reduction, elementwise = _geometries(kernel_plan, shape, strides, sm_count, force_int64, tunables)
        if len(_sites) >= MAX_SITES:
            _sites.pop(next(iter(_sites)))
        found = _sites[key] = Site(kernel_plan, reduction, elementwise, code, key)
    return found


def forward_site(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    training: bool,
    plan: str,
    sm_count: int,
    force_int64: bool = False,
    activation: str | None = None,
    counter: torch.Tensor | None = None,
) -> Site:
    """The launch site of ``forward_train`` (``training``) or ``forward_eval`` on these tensors
    (with ``counter``: a training forward that also counts the batch); its :meth:`Site.derived`
    sites serve the backward of the same call."""
    flags = tensors_key(x, weight, bias, running_mean, running_var, residual)
    if training:
        return site(x, plan, sm_count, force_int64, activation, "train", flags, tensors_key(counter))
    return site(x, _eval_token(plan), sm_count, force_int64, activation, "eval", flags)


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
    found = forward_site(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        training=True,
        plan=plan,
        sm_count=sm_count,
        force_int64=force_int64,
        activation=activation,
    )
    return found.forward_train(
        x, weight, bias, running_mean, running_var, momentum, eps, negative_slope, residual
    )


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
    found = forward_site(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        training=False,
        plan=plan,
        sm_count=sm_count,
        force_int64=force_int64,
        activation=activation,
    )
    return found.forward_eval(x, weight, bias, running_mean, running_var, eps, negative_slope, residual)


def _eval_token(plan: str) -> str:
    """Eval always runs the eval plan, with the token's tunables."""
    return plan if parse_plan(plan)[0].name == "eval" else "eval"


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
    flags = (needs, need_residual, from_output, tensors_key(dy, x, weight, bias, residual))
    found = site(x, plan, sm_count, force_int64, activation, "backward", *flags)
    norm = Normalization(save, None, weight, bias, SAVED, 0.0, found.activation, negative_slope)
    grads = found.backward(
        dy, x, norm, needs, residual=residual, need_residual=need_residual, from_output=from_output
    )
    return grads if need_residual else grads[:3]


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
    flags = (
        needs,
        need_residual,
        from_output,
        tensors_key(dy, x, weight, bias, running_mean, running_var, residual),
    )
    found = site(x, _eval_token(plan), sm_count, force_int64, activation, "eval-backward", *flags)
    norm = Normalization(
        running_mean, running_var, weight, bias, RUNNING, eps, found.activation, negative_slope
    )
    grads = found.backward(
        dy, x, norm, needs, residual=residual, need_residual=need_residual, from_output=from_output
    )
    return grads if need_residual else grads[:3]
