"""The benchmark matrix shared by every suite: shapes, dtypes, layouts, passes and backends.

A *case* is one input (shape, dtype, memory layout); a *pass* is what is timed on it (training
forward, backward, eval forward, forward+backward); a *backend* is what runs it. ``MATRIX`` lists
every (pass, case, backend) triple in the order of :func:`tier`, so that a run cut short by its time
budget keeps what matters most: first what the speed targets are judged on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import tritonbn

# (family, shapes): the layers of the seed's LeNet, ResNet-style activations, a few channels at
# high resolution (one program per channel would idle most of a GPU), and large (N, C) matrices.
SHAPES: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = (
    ("lenet", ((256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (256, 84))),
    ("resnet", ((32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7))),
    ("small-c", ((8, 3, 224, 224), (16, 6, 256, 256))),
    ("large-2d", ((8192, 1024), (65536, 64))),
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PASSES = ("forward+backward", "forward", "backward", "eval")
TRAINING_PLANS = tuple(plan for plan in tritonbn.PLANS if plan != "eval")
# Backends by name: "tritonbn" is the dispatcher's own choice, a plan name forces that Triton
# plan, "torch" is torch.nn.BatchNorm (cuDNN or ATen), "reference" tritonbn's plain-torch oracle.
COMMON_BACKENDS = ("tritonbn", "torch", "reference", "torch.compile")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Case:
    """One benchmark input: shape, dtype and memory layout, and the family its shape comes from."""

    family: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{dtype_name(self.dtype)}-{self.layout}"

    def make_input(self, device: torch.device, requires_grad: bool) -> torch.Tensor:
        """Fresh standard-normal values in this case's dtype and layout (never zeros: zeros would
        make every variance 0 and every normalized value equal)."""
        x = torch.randn(self.shape, device=device, dtype=self.dtype)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        return x.requires_grad_(requires_grad)


CASES: tuple[Case, ...] = tuple(
    Case(family, shape, dtype, channels_last)
    for dtype in DTYPES
    for family, shapes in SHAPES
    for shape in shapes
    for channels_last in ((False, True) if len(shape) == 4 else (False,))
)


def backends_for(pass_name: str) -> tuple[str, ...]:
    """The backends compared on ``pass_name``: in eval every forced plan runs the 'eval' plan, and
    the 'eval' plan cannot train, so each pass gets only the plans that mean something for it."""
    plans = ("eval",) if pass_name == "eval" else TRAINING_PLANS
    return (COMMON_BACKENDS[0], *plans, *COMMON_BACKENDS[1:])


# The backends every speedup needs: tritonbn's own choice and its baseline.
CORE_BACKENDS = COMMON_BACKENDS[:2]
TIERS = 8


def tier(pass_name: str, case: Case, backend: str) -> int:
    """When (pass, case, backend) runs, from 0 (first) to TIERS - 1: in float32, 0 is
    forward+backward on tritonbn and torch (what the speed targets are judged on), 1 their other
    passes, 2 the forced plans and the reference, 3 torch.compile; 4 to 7 the same in half
    precision."""
    if backend == "torch.compile":
        rank = 3
    elif backend in CORE_BACKENDS:
        rank = 0 if pass_name == PASSES[0] else 1
    else:
        rank = 2
    return rank + (4 if case.dtype != torch.float32 else 0)


def _priority(entry: tuple[str, Case, str]) -> tuple[int, ...]:
    """Sort key of MATRIX: by :func:`tier`, and within a tier pass by pass; torch.compile's tiers go
    case by case instead, so that one compilation of a case serves its passes in a row."""
    pass_name, case, backend = entry
    order = (CASES.index(case), PASSES.index(pass_name))
    return (tier(*entry), *(order if backend == "torch.compile" else order[::-1]))


MATRIX: tuple[tuple[str, Case, str], ...] = tuple(
    sorted(
        (
            (pass_name, case, backend)
            for pass_name in PASSES
            for case in CASES
            for backend in backends_for(pass_name)
        ),
        key=_priority,
    )
)
