"""Writing idx files (Fashion-MNIST's format) for the data and trainer tests."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

from tritonbn.data import IMAGE_MAGIC, LABEL_MAGIC


def write_idx(path: str | os.PathLike[str], tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an idx file: (N, H, W) as images, (N,) as labels; gzip-compressed
    when ``path`` ends in ``.gz``."""
    if tensor.dtype != torch.uint8 or tensor.dim() not in (1, 3):
        raise ValueError(
            f"write_idx wants a uint8 tensor of 1 or 3 dimensions, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    magic = LABEL_MAGIC if tensor.dim() == 1 else IMAGE_MAGIC
    header = struct.pack(f">{1 + tensor.dim()}I", magic, *tensor.shape)
    payload = header + tensor.contiguous().cpu().numpy().tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
