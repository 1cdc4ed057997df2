"""``tritonbn.fuse``: fold the tails of torchvision's ResNet blocks — the last BatchNorm, the
residual add and the ReLU — into one tritonbn BatchNorm with ``residual=`` and ``activation="relu"``.

A fused block is the same module with the same submodules (so the same state_dict keys, and a
checkpoint loads both ways), whose class becomes a subclass of torchvision's with a forward that
calls ``bn(conv(x), residual=identity)``; the block's inner BatchNorm + ReLU pairs take the ReLU as
their fused activation. torchvision is imported only when ``fuse`` finds it already loaded, or
when a pickled fused block is loaded.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch import nn

from .convert import _has_hooks, convert
from .modules import _TritonBatchNorm

__all__ = ["fuse"]


def _basic_block_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    # torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + identity), with both
    # ReLUs fused into bn1 and bn2 and the add into bn2.
    identity = x if self.downsample is None else self.downsample(x)
    out = self.conv2(self.bn1(self.conv1(x)))
    return self.bn2(out, residual=_as_dtype_of(identity, out))


def _bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    # torchvision's Bottleneck: relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + identity).
    identity = x if self.downsample is None else self.downsample(x)
    out = self.bn1(self.conv1(x))
    out = self.conv3(self.bn2(self.conv2(out)))
    return self.bn3(out, residual=_as_dtype_of(identity, out))


def _as_dtype_of(identity: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The residual in the dtype of the branch it joins: torchvision's ``out += identity`` keeps
    ``out``'s, and under autocast a block's input may be float32 where its convolutions give
    bfloat16 or float16. ``to`` returns the tensor itself where the dtypes agree; called
    unconditionally, it traces under torch.fx, where comparing dtypes would be control flow."""
    return identity.to(out.dtype)


# name → (torchvision class name, fused forward, the BatchNorms in order; the last takes the add)
_BLOCKS = {
    "FusedBasicBlock": ("BasicBlock", _basic_block_forward, ("bn1", "bn2")),
    "FusedBottleneck": ("Bottleneck", _bottleneck_forward, ("bn1", "bn2", "bn3")),
}
_classes: dict[str, type[nn.Module]] = {}


def _fused_class(name: str) -> type[nn.Module]:
    """The fused subclass ``name`` of torchvision's block (built once, importing torchvision)."""
    if name not in _classes:
        from torchvision.models import resnet

        base_name, forward, _ = _BLOCKS[name]
        base = getattr(resnet, base_name)
        doc = (
            f"torchvision's ``{base_name}`` with its tail (BatchNorm, residual add, ReLU) fused "
            "into one tritonbn BatchNorm; made by ``tritonbn.fuse``."
        )
        cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__doc__": doc})
        cls.__qualname__ = name
        _classes[name] = cls
    return _classes[name]


def __getattr__(name: str) -> type[nn.Module]:
    # Lets pickle find the fused classes (tritonbn.fuse.FusedBasicBlock) without torchvision
    # being imported at tritonbn's import.
    if name in _BLOCKS:
        return _fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fusable(block: nn.Module, norms: tuple[str, ...], uses: Counter[int]) -> bool:
    """Whether ``block`` has the structure its fused forward assumes, nothing hooked or shared."""
    relu = getattr(block, "relu", None)
    if type(relu) is not nn.ReLU or _has_hooks(relu) or _has_hooks(block):
        return False
    for name in norms:
        norm = getattr(block, name, None)
        if (
            not isinstance(norm, _TritonBatchNorm)
            or norm.activation is not None
            or norm.memory_efficient
            or uses[id(norm)] > 1
            or _has_hooks(norm)
        ):
            return False
    return True


def fuse(model: nn.Module) -> nn.Module:
    """Convert ``model`` with ``tritonbn.convert(model, fuse_activations=True)``, then fuse the
    tail of every torchvision ResNet ``BasicBlock`` and ``Bottleneck``; returns ``model``.

    In a fused block the last BatchNorm computes ``relu(bn(conv(x)) + identity)`` in one pass
    (``residual=identity``, ``activation="relu"``), forward and backward, and its inner
    BatchNorm + ReLU pairs fuse the ReLU. The fusion is in place and keeps every submodule,
    parameter and buffer: the state_dict keys are unchanged, so checkpoints load into the fused
    model and from it into an unfused one, and an optimizer built before stays valid. The model
    computes the same function (the block's ``relu`` module is no longer called).

    Blocks of exactly torchvision's two classes are fused (subclasses may change the forward),
    unless a hook is registered on the block, its ReLU or one of its BatchNorms, a BatchNorm is
    shared, not convertible or already has an activation. torchvision is optional: without it
    loaded there is no ResNet block to fuse, and ``fuse`` only converts.

    Args:
        model: any ``nn.Module``; typically ``torchvision.models.resnet18()`` … ``resnet152()``.

    Returns:
        ``model``, converted and fused in place.

    Examples:
        >>> model = tritonbn.fuse(torchvision.models.resnet50())
        >>> model(torch.randn(2, 3, 64, 64)).sum().backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    convert(model, fuse_activations=True)
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is None:
        return model
    targets = {getattr(resnet, base): name for name, (base, _, _) in _BLOCKS.items()}
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for block in list(model.modules()):
        name = targets.get(type(block))
        if name is None:
            continue
        norms = _BLOCKS[name][2]
        if not _fusable(block, norms, uses):
            continue
        for norm_name in norms:
            getattr(block, norm_name).activation = "relu"
        block.__class__ = _fused_class(name)
    return model
