"""The seed notebook's LeNet with batch normalization, its BatchNorm classes chosen by name."""

from __future__ import annotations

from torch import nn

from . import modules

__all__ = ["BATCH_NORMS", "LeNet"]

# name -> (2-D class for convolution maps, 1-D class for fully-connected features)
BATCH_NORMS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "tritonbn": (modules.BatchNorm2d, modules.BatchNorm1d),
    "torch": (nn.BatchNorm2d, nn.BatchNorm1d),
}


class LeNet(nn.Sequential):
    """LeNet-5 with batch normalization after every convolution and hidden linear layer, for
    1x28x28 images and 10 classes, layer for layer the seed notebook's ``net``.

    The layers sit at the notebook's indices, so ``net[1]`` is the first BatchNorm and
    ``net[15]`` the classifier.

    Args:
        batch_norm (str): the BatchNorm classes, ``"tritonbn"`` (``tritonbn.BatchNorm2d/1d``,
            default) or ``"torch"`` (``torch.nn.BatchNorm2d/1d``).

    Shape:
        - Input: :math:`(N, 1, 28, 28)`
        - Output: :math:`(N, 10)`, the class logits

    Examples::

        >>> net = tritonbn.LeNet()
        >>> net(torch.randn(256, 1, 28, 28)).shape
        torch.Size([256, 10])
    """

    def __init__(self, batch_norm: str = "tritonbn") -> None:
        if batch_norm not in BATCH_NORMS:
            raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORMS)}, got {batch_norm!r}")
        norm2d, norm1d = BATCH_NORMS[batch_norm]
        super().__init__(
            nn.Conv2d(1, 6, kernel_size=5),
            norm2d(6),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5),
            norm2d(16),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 120),
            norm1d(120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            norm1d(84),
            nn.Sigmoid(),
            nn.Linear(84, 10),
        )
        self.batch_norm = batch_norm
