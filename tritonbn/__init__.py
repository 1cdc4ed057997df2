"""tritonbn: fused Triton kernels for Batch Normalization, a drop-in for torch.nn.BatchNorm.

>>> import torch, tritonbn
>>> bn = tritonbn.BatchNorm2d(6)                       # like torch.nn.BatchNorm2d(6)
>>> y = bn(torch.randn(8, 6, 24, 24))
>>> print(tritonbn.explain(torch.randn(8, 6, 24, 24)))  # which backend and kernel plan, and why
"""

from . import reference, torch_guards  # noqa: F401 (torch_guards installs its guards)
from .convert import convert
from .dispatch import BACKENDS, PLANS, Plan, backend, explain
from .functional import batch_norm
from .fuse import fuse
from .models import LeNet
from .modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PLANS",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm2d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LeNet",
    "Plan",
    "SyncBatchNorm",
    "__version__",
    "backend",
    "batch_norm",
    "convert",
    "convert_sync_batchnorm",
    "explain",
    "fuse",
    "reference",
]
