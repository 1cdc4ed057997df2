"""``tritonbn.convert``: put tritonbn's BatchNorm into an existing model, optionally folding the
activation that follows each one into it."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, _TritonBatchNorm

__all__ = ["convert"]

_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
}

# Activation modules (exact classes: a subclass may change forward) and their fused names.
_FUSABLE_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.Sigmoid: "sigmoid",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
}


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks
    )


def _fuse_in(sequential: nn.Sequential, uses: Counter[int]) -> None:
    """Fold each (tritonbn BatchNorm, activation) pair of adjacent children of ``sequential``."""
    children = list(sequential.named_children())
    for (_, norm), (act_name, act) in pairwise(children):
        activation = _FUSABLE_ACTIVATIONS.get(type(act))
        if (
            activation is None
            or not isinstance(norm, _TritonBatchNorm)
            or norm.activation is not None
            or uses[id(norm)] > 1  # a shared BatchNorm runs elsewhere without the activation
            or _has_hooks(norm)
            or _has_hooks(act)
        ):
            continue
        norm.activation = activation
        if activation == "leaky_relu":
            norm.negative_slope = float(act.negative_slope)
        setattr(sequential, act_name, nn.Identity())


def convert(module: nn.Module, *, fuse_activations: bool = False) -> nn.Module:
    """Make every ``torch.nn.BatchNorm1d``/``BatchNorm2d`` in ``module`` a tritonbn one; returns it.

    The conversion is in place and changes nothing but the class: each module keeps its identity,
    parameters (the same Parameter objects, so an optimizer built before stays valid), buffers,
    device, dtype, requires_grad, train/eval mode and hooks. Subclasses of torch's BatchNorm (such
    as SyncBatchNorm) and other modules are left alone.

    With ``fuse_activations=True``, a tritonbn BatchNorm directly followed, inside an
    ``nn.Sequential``, by an ``nn.ReLU``, ``nn.Sigmoid``, ``nn.LeakyReLU``, ``nn.SiLU`` or
    ``nn.Tanh`` (``inplace`` or not) takes that activation as its fused ``activation``, and the
    activation's slot becomes an ``nn.Identity``: indices, and so the state_dict keys, stay the
    same, and the model computes the same function. Pairs where either module has hooks, the
    BatchNorm is used more than once or already has an activation are left unfused.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: 'module' must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(
            f"convert: 'fuse_activations' must be a bool, got {type(fuse_activations).__name__}"
        )
    for submodule in module.modules():
        replacement = _REPLACEMENTS.get(type(submodule))
        if replacement is not None:
            submodule.__class__ = replacement
    if fuse_activations:
        uses = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
        for submodule in list(module.modules()):
            # Only Sequentials that run their children in order (a subclass may not).
            if isinstance(submodule, nn.Sequential) and type(submodule).forward is nn.Sequential.forward:
                _fuse_in(submodule, uses)
    return module
