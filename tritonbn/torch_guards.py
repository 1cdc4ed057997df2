"""Guards on torch's own BatchNorm utilities that would silently drop a fused activation.

A tritonbn BatchNorm may carry an ``activation`` (``relu``, ``sigmoid``, ...) applied after the
normalization. torch's utilities that take a BatchNorm apart know only its statistics and affine
parameters: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` copies them into a torch
SyncBatchNorm, and ``torch.nn.utils.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` fold them into
the layer before. Either way the result no longer applies the activation: a model that computes
another function, with no error. Installed at import, each guard raises a ValueError that names
the layers and what to do instead, and leaves every other call to torch unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch.nn.utils
import torch.nn.utils.fusion
from torch import nn

__all__: list[str] = []


def fused_batchnorms(module: nn.Module) -> list[str]:
    """Names (``""`` for ``module`` itself) of the BatchNorm layers in ``module`` that carry a fused
    activation."""
    return [
        name
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and getattr(sub, "activation", None) is not None
    ]


def _guard_convert_sync_batchnorm() -> None:
    """Make ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` refuse a model with a tritonbn
    BatchNorm that fuses an activation: torch's SyncBatchNorm has none.
    ``tritonbn.convert_sync_batchnorm`` keeps it."""
    original = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"].__func__
    if getattr(original, "_tritonbn_guard", False):
        return

    @functools.wraps(original)
    def convert_sync_batchnorm(cls: type, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        fused = fused_batchnorms(module) if isinstance(module, nn.Module) else []
        if fused:
            where = ", ".join(repr(name) if name else "the module itself" for name in fused)
            raise ValueError(
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm would drop the fused activation of "
                f"the tritonbn BatchNorm layer(s) {where} (torch's SyncBatchNorm has no "
                "activation), silently changing what the model computes; use "
                "tritonbn.convert_sync_batchnorm(module, process_group), which keeps it"
            )
        return original(cls, module, process_group)

    convert_sync_batchnorm._tritonbn_guard = True
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)


def _refuse_fused_activation(function: str, bn: object) -> None:
    """Raise ValueError when ``bn``, the BatchNorm given to torch's ``function``, fuses an activation."""
    activation = getattr(bn, "activation", None)
    if activation is None:
        return
    raise ValueError(
        f"torch.nn.utils.{function}: bn ({type(bn).__name__}) fuses the activation {activation!r}, "
        "which a folded layer cannot apply: the result would compute the layer without it. Fold "
        "first and fuse activations afterwards (tritonbn.convert(model, fuse_activations=True)), "
        f"or set bn.activation = None and apply {activation!r} after the folded layer"
    )


def _guarded_fold(name: str, fold: Any) -> Any:
    """``fold`` (torch's ``fuse_conv_bn_eval`` or ``fuse_linear_bn_eval``), refusing a BatchNorm
    with a fused activation before it reads anything. It takes the arguments ``fold`` takes, by
    position or by name; ``bn`` is found by ``fold``'s signature."""
    signature = inspect.signature(fold)

    @functools.wraps(fold)
    def guarded(*args: Any, **kwargs: Any) -> nn.Module:
        try:
            bn = signature.bind(*args, **kwargs).arguments.get("bn")
        except TypeError:
            bn = None  # torch's own call raises its own error about the arguments
        _refuse_fused_activation(name, bn)
        return fold(*args, **kwargs)

    guarded._tritonbn_guard = True
    return guarded


def _guard_fusion() -> None:
    """Guard ``torch.nn.utils.fuse_conv_bn_eval`` and ``fuse_linear_bn_eval``, in both the places
    they are reached from: ``torch.nn.utils`` and ``torch.nn.utils.fusion`` (torch.ao's fusers)."""
    for name in ("fuse_conv_bn_eval", "fuse_linear_bn_eval"):
        original = getattr(torch.nn.utils.fusion, name)
        if getattr(original, "_tritonbn_guard", False):
            continue
        guarded = _guarded_fold(name, original)
        for namespace in (torch.nn.utils.fusion, torch.nn.utils):
            if getattr(namespace, name, None) is original:
                setattr(namespace, name, guarded)


_guard_convert_sync_batchnorm()
_guard_fusion()
