"""What the installed torch offers, detected from its API rather than assumed from a version.

tritonbn supports every torch from the oldest one CI tests (see ``pyproject.toml``) to the newest;
features a newer torch brings are looked up here once, at import, and the rest of the package asks
this module instead of comparing version strings.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.autograd import forward_ad as _forward_ad

# torch 2.14 added ``bias=`` to the BatchNorm constructors (an affine module with a weight but no
# bias); older releases take no such argument.
BATCHNORM_HAS_BIAS_ARG = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters


def _eval_accepts_zero_eps() -> bool:
    try:
        torch.nn.functional.batch_norm(
            torch.zeros(2, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0
        )
    except ValueError:
        return False
    return True


# torch 2.14 accepts eps=0 in evaluation mode (a running variance > 0 keeps it finite); older
# releases refuse eps <= 0 everywhere. Asked of torch itself, once.
EVAL_ACCEPTS_ZERO_EPS = _eval_accepts_zero_eps()


def batchnorm_bias_kwargs(owner: str, bias: bool) -> dict[str, bool]:
    """The ``bias=`` keyword to pass to torch's BatchNorm constructor: ``{"bias": bias}`` where
    torch has the argument, nothing where it has not and ``bias`` is the default True.

    Raises TypeError (as that torch's own BatchNorm does for an unknown keyword) for
    ``bias=False`` on a torch without the argument, naming the torch version.
    """
    if BATCHNORM_HAS_BIAS_ARG:
        return {"bias": bias}
    if bias is not True:
        raise TypeError(
            f"{owner}: 'bias' needs torch >= 2.14 (torch {torch.__version__}'s BatchNorm has no "
            f"bias argument), got bias={bias!r}"
        )
    return {}


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``): its dual
    tensors need each op's forward derivative, which PyTorch's batch_norm has and tritonbn's
    autograd Functions do not. torch keeps the open level in ``forward_ad._current_level``
    (-1: none), the one place it is recorded in Python."""
    return _forward_ad._current_level >= 0
