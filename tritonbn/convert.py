"""``tritonbn.convert``: put tritonbn's BatchNorm into an existing model, optionally folding the
activation that follows each one into it."""

from __future__ import annotations

import sys
from collections import Counter
from itertools import pairwise

from torch import nn

from .functional import invertible
from .kernels.activation_table import TABLE as ACTIVATION_TABLE
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _TritonBatchNorm,
)

__all__ = ["convert"]

_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    # A Lazy module not yet materialized (a materialized one is already an nn.BatchNormXd).
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}

# Modules that can take a fused activation from the module that follows them.
_FUSING_NORMS = (_TritonBatchNorm, FrozenBatchNorm2d)


def _replacements() -> dict[type[nn.Module], type[nn.Module]]:
    """``_REPLACEMENTS`` plus torchvision's FrozenBatchNorm2d when torchvision is loaded.

    A model holding torchvision's module has imported ``torchvision.ops.misc``; without it there
    is nothing of torchvision's to convert, so torchvision is never imported here.
    """
    misc = sys.modules.get("torchvision.ops.misc")
    frozen = getattr(misc, "FrozenBatchNorm2d", None)
    if frozen is None:
        return _REPLACEMENTS
    return {**_REPLACEMENTS, frozen: FrozenBatchNorm2d}


# Activation modules (exact classes: a subclass may change forward) and their fused names.
_FUSABLE_ACTIVATIONS: dict[type[nn.Module], str] = {entry.module: entry.name for entry in ACTIVATION_TABLE}


def _has_hooks(module: nn.Module) -> bool:
    """Whether a user hook is registered on ``module`` (a Lazy module's own materializing
    pre-hook is not one)."""
    pre_hooks = set(module._forward_pre_hooks)
    lazy_hook = getattr(module, "_initialize_hook", None)
    if lazy_hook is not None:
        pre_hooks.discard(lazy_hook.id)
    return bool(module._forward_hooks or pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _fuse_in(sequential: nn.Sequential, uses: Counter[int]) -> None:
    """Fold each (tritonbn BatchNorm, activation) pair of adjacent children of ``sequential``."""
    children = list(sequential.named_children())
    for (_, norm), (act_name, act) in pairwise(children):
        activation = _FUSABLE_ACTIVATIONS.get(type(act))
        if (
            activation is None
            or not isinstance(norm, _FUSING_NORMS)
            or norm.activation is not None
            or uses[id(norm)] > 1  # a shared BatchNorm runs elsewhere without the activation
            or _has_hooks(norm)
            or _has_hooks(act)
        ):
            continue
        slope = float(act.negative_slope) if activation == "leaky_relu" else norm.negative_slope
        if getattr(norm, "memory_efficient", False) and not invertible(activation, slope):
            continue  # memory_efficient=True recovers the input from the output: it stays as it is
        norm.activation = activation
        norm.negative_slope = slope
        setattr(sequential, act_name, nn.Identity())


def convert(module: nn.Module, *, fuse_activations: bool = False) -> nn.Module:
    """Make every torch BatchNorm in ``module`` a tritonbn one; returns ``module``.

    Converted: ``torch.nn.BatchNorm1d``/``2d``/``3d`` (to ``tritonbn.BatchNorm1d``/``2d``/``3d``),
    ``torch.nn.LazyBatchNorm1d``/``2d``/``3d`` (to ``tritonbn.LazyBatchNorm1d``/``2d``/``3d``,
    which become ``tritonbn.BatchNorm1d``/``2d``/``3d`` when their first input materializes them,
    so the first call already runs on tritonbn; a Lazy module already materialized is a plain
    ``torch.nn.BatchNormXd`` and converts as one) and ``torchvision.ops.misc.FrozenBatchNorm2d``
    (to ``tritonbn.FrozenBatchNorm2d``: same buffers and eps, tritonbn's eval plan; torchvision is
    not needed otherwise).

    The conversion is in place and changes nothing but the class: each module keeps its identity,
    parameters (the same Parameter objects, so an optimizer built before stays valid), buffers,
    device, dtype, requires_grad, train/eval mode and hooks. Subclasses of those classes (a
    user's own BatchNorm2d with its own forward), other norms (``torch.nn.SyncBatchNorm``: see
    :func:`tritonbn.convert_sync_batchnorm`) and other modules are left alone.

    With ``fuse_activations=True``, a tritonbn BatchNorm (or FrozenBatchNorm2d) directly followed,
    inside an ``nn.Sequential``, by an ``nn.ReLU``, ``nn.Sigmoid``, ``nn.LeakyReLU``, ``nn.SiLU``
    or ``nn.Tanh`` (``inplace`` or not) takes that activation as its fused ``activation``, and the
    activation's slot becomes an ``nn.Identity``: indices, and so the state_dict keys, stay the
    same, and the model computes the same function. Pairs where either module has hooks, the
    BatchNorm is used more than once, already has an activation, or is ``memory_efficient`` and
    the activation cannot be undone from its output, are left unfused. A fused activation lives in
    the BatchNorm, where folding it into the layer before for inference cannot keep it:
    ``torch.nn.utils.fuse_conv_bn_eval`` and ``fuse_linear_bn_eval`` raise a ValueError on such a
    BatchNorm (``tritonbn.torch_guards``), so fold first, then fuse activations.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: 'module' must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(f"convert: 'fuse_activations' must be a bool, got {type(fuse_activations).__name__}")
    replacements = _replacements()
    for submodule in module.modules():
        replacement = replacements.get(type(submodule))
        if replacement is not None:
            submodule.__class__ = replacement
    if fuse_activations:
        uses = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
        for submodule in list(module.modules()):
            # Only Sequentials that run their children in order (a subclass may not).
            if isinstance(submodule, nn.Sequential) and type(submodule).forward is nn.Sequential.forward:
                _fuse_in(submodule, uses)
    return module
