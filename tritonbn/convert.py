"""``tritonbn.convert``: put tritonbn's BatchNorm into an existing model."""

from __future__ import annotations

from torch import nn

from .modules import BatchNorm1d, BatchNorm2d

__all__ = ["convert"]

_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
}


def convert(module: nn.Module) -> nn.Module:
    """Make every ``torch.nn.BatchNorm1d``/``BatchNorm2d`` in ``module`` a tritonbn one; returns it.

    The conversion is in place and changes nothing but the class: each module keeps its identity,
    parameters (the same Parameter objects, so an optimizer built before stays valid), buffers,
    device, dtype, requires_grad, train/eval mode and hooks. Subclasses of torch's BatchNorm (such
    as SyncBatchNorm) and other modules are left alone.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: 'module' must be a torch.nn.Module, got {type(module).__name__}")
    for submodule in module.modules():
        replacement = _REPLACEMENTS.get(type(submodule))
        if replacement is not None:
            submodule.__class__ = replacement
    return module
