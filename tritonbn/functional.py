"""``tritonbn.batch_norm``: torch.nn.functional.batch_norm's signature on tritonbn's dispatcher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._checks import check_batch_norm_args
from .autograd import TritonBatchNorm
from .dispatch import select_plan

__all__ = ["batch_norm"]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization with the same signature and semantics as
    ``torch.nn.functional.batch_norm``, differentiable in ``input``, ``weight`` and ``bias``.

    In training, the biased batch variance normalizes ``input`` and the running statistics (when
    given) are updated in place afterwards with the unbiased one:
    ``running = (1 - momentum)·running + momentum·batch``. In eval the running statistics
    normalize. The output keeps the input's dtype and memory format. Bad arguments raise before
    anything is changed. ``tritonbn.explain`` tells which backend and kernel plan run the call.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return run_checked(input, running_mean, running_var, weight, bias, training, momentum, eps)


def run_checked(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``batch_norm`` for arguments that ``check_batch_norm_args`` has already accepted."""
    plan = select_plan(input, training)
    if plan.backend == "torch":
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if plan.backend == "reference":
        return reference.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    x = input.contiguous() if plan.copies_input else input
    return TritonBatchNorm.apply(
        x, weight, bias, running_mean, running_var, training, float(momentum), float(eps),
        plan.kernel,
    )
