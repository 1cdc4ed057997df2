"""The readable reference: the seed notebook's batch-norm algorithm in plain torch ops.

It follows PyTorch's conventions rather than the notebook's: ``momentum`` is the weight of the new
batch (the notebook's 0.9 on the old value is torch's 0.1 on the new one) and the running
variance receives the unbiased batch variance. It works in any floating dtype (half inputs are
computed in float32 and cast back, like torch), is differentiable by autograd, and is the oracle
of the test suite when run in float64.
"""

from __future__ import annotations

import torch

from ._checks import check_batch_norm_args

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
    """Batch normalization over every dimension but the channel dimension 1.

    Same signature and semantics as ``torch.nn.functional.batch_norm``. In training the batch
    statistics normalize ``input`` and then, if given, update the running statistics in place:
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the unbiased variance.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    compute_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(compute_dtype)
    reduce_dims = [0, *range(2, x.dim())]
    channel_shape = [1, x.shape[1]] + [1] * (x.dim() - 2)

    if training:
        mean = x.mean(dim=reduce_dims)
        var = ((x - mean.view(channel_shape)) ** 2).mean(dim=reduce_dims)
    else:
        mean = running_mean.to(compute_dtype)
        var = running_var.to(compute_dtype)

    x_hat = (x - mean.view(channel_shape)) / torch.sqrt(var.view(channel_shape) + eps)
    y = x_hat
    if weight is not None:
        y = y * weight.to(compute_dtype).view(channel_shape)
    if bias is not None:
        y = y + bias.to(compute_dtype).view(channel_shape)

    if training and running_mean is not None:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            unbiased_var = var.detach() * (count / (count - 1))
            running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(running_var.dtype))
    return y.to(input.dtype)
