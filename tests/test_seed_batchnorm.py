"""The seed notebook's API, ``tritonbn.BatchNorm(num_features, num_dims)``: shapes, buffers, aliases,
and the notebook's LeNet training exactly like the same net built on torch's BatchNorm1d/2d."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn

from .helpers import BACKENDS, assert_modules_match, twin_modules


def seed_batchnorm(num_dims: int) -> Callable[..., nn.Module]:
    """``tritonbn.BatchNorm`` with ``num_dims`` fixed, shaped like torch's module constructors."""
    return lambda num_features, **options: tritonbn.BatchNorm(num_features, num_dims, **options)


@pytest.mark.parametrize(
    ("num_dims", "torch_cls", "shape"),
    [
        (2, nn.BatchNorm1d, (6, 5)),
        (4, nn.BatchNorm2d, (3, 5, 4, 3)),
    ],
    ids=["fully-connected", "convolution"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_num_dims_2_and_4_match_torch(num_dims, torch_cls, shape, backend):
    module, oracle = twin_modules(seed_batchnorm(num_dims), torch_cls, shape[1], torch.float32)
    gen = torch.Generator().manual_seed(0)
    with tritonbn.backend(backend):
        for training in (True, False, True):
            module.train(training)
            oracle.train(training)
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            assert_modules_match(
                module, oracle, x, torch.randn(shape, generator=gen, dtype=torch.float64), torch.float32
            )


@pytest.mark.parametrize("num_dims", [0, 1, 3, 5, "4", None])
def test_other_num_dims_raise(num_dims):
    with pytest.raises(ValueError, match=rf"'num_dims' must be 2 or 4, got {num_dims!r}"):
        tritonbn.BatchNorm(4, num_dims)


@pytest.mark.parametrize(
    ("num_dims", "shape", "expected"),
    [
        (2, (3, 4, 5), r"2D \(N, C\), got a 3D tensor"),
        (2, (3, 4, 2, 2), r"2D \(N, C\), got a 4D tensor"),
        (4, (3, 4), r"4D \(N, C, H, W\), got a 2D tensor"),
    ],
)
def test_input_rank_must_match_num_dims(num_dims, shape, expected):
    module = tritonbn.BatchNorm(4, num_dims)
    with pytest.raises(ValueError, match=rf"'input' must be {expected}"):
        module(torch.randn(shape))
    assert int(module.num_batches_tracked) == 0


def test_statistics_are_registered_buffers():
    module = tritonbn.BatchNorm(3, 4)
    buffers = dict(module.named_buffers())
    assert set(buffers) == {"running_mean", "running_var", "num_batches_tracked"}
    assert set(module.state_dict()) == {*buffers, "weight", "bias"}
    assert {name for name, _ in module.named_parameters()} == {"weight", "bias"}
    assert torch.equal(module.moving_mean, torch.zeros(3)) and torch.equal(module.moving_var, torch.ones(3))
    module.to(torch.float64)
    assert module.moving_mean.dtype == module.moving_var.dtype == module.gamma.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_carry_no_autograd_history(backend):
    module = tritonbn.BatchNorm(3, 4)
    with tritonbn.backend(backend):
        for _ in range(3):
            x = torch.randn(4, 3, 2, 2, requires_grad=True)
            module(x * 2).sum().backward()
    assert int(module.num_batches_tracked) == 3
    for stat in (module.moving_mean, module.moving_var):
        assert stat.grad_fn is None
        assert not stat.requires_grad
    assert not torch.equal(module.moving_mean, torch.zeros(3))


def test_aliases_name_the_notebook_attributes():
    module = tritonbn.BatchNorm(3, 2)
    assert module.gamma is module.weight
    assert module.beta is module.bias
    assert module.moving_mean is module.running_mean
    assert module.moving_var is module.running_var
    bare = tritonbn.BatchNorm(3, 2, affine=False, track_running_stats=False)
    assert bare.gamma is None and bare.beta is None
    assert bare.moving_mean is None and bare.moving_var is None


def test_repr_is_torchs_plus_num_dims():
    torch_repr = repr(nn.BatchNorm2d(6, momentum=None))
    expected = torch_repr.replace("BatchNorm2d(", "BatchNorm(")[:-1] + ", num_dims=4)"
    assert repr(tritonbn.BatchNorm(6, 4, momentum=None)) == expected


def lenet(norm2d: Callable[[int], nn.Module], norm1d: Callable[[int], nn.Module]) -> nn.Sequential:
    """The seed notebook's LeNet with the given batch-norm constructors."""
    return nn.Sequential(
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


def train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    """``steps`` Adam steps (lr 1e-3) on one batch; the losses before each step."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# The layers feeding a BatchNorm (indices 0, 4, 9, 12): their bias has zero gradient in exact
# arithmetic (BatchNorm subtracts the batch mean) and some weights nearly so. Adam divides each
# gradient by its own running RMS, so on a backend that rounds differently from torch these take
# steps of up to lr driven by rounding noise, and the running means follow the biases. Only the
# torch backend can match them; the others are held to the BatchNorms and the classifier.
NOISE_DRIVEN_LAYERS = {"0", "4", "9", "12"}


def noise_driven(name: str) -> bool:
    return name.split(".")[0] in NOISE_DRIVEN_LAYERS or name.endswith("running_mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lenet_trains_like_torch_batchnorm(backend):
    torch.manual_seed(0)
    seed_net = lenet(seed_batchnorm(4), seed_batchnorm(2))
    torch_net = lenet(nn.BatchNorm2d, nn.BatchNorm1d)
    torch_net.load_state_dict(seed_net.state_dict(), strict=True)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    with tritonbn.backend(backend):
        losses = train(seed_net, images, labels, steps=4)
    torch_losses = train(torch_net, images, labels, steps=4)

    torch.testing.assert_close(losses, torch_losses, rtol=1e-6, atol=1e-6)
    compared = 0
    for (name, value), (torch_name, torch_value) in zip(
        seed_net.state_dict().items(), torch_net.state_dict().items(), strict=True
    ):
        assert name == torch_name
        if backend != "torch" and noise_driven(name):
            continue
        torch.testing.assert_close(value, torch_value, rtol=1e-6, atol=1e-6, msg=name)
        compared += 1
    # The torch backend compares all 30 entries; the others four BatchNorms x 4 and the classifier's 2.
    assert compared == (30 if backend == "torch" else 18)
    if backend == "torch":
        seed_net.eval()
        torch_net.eval()
        torch.testing.assert_close(seed_net(images), torch_net(images), rtol=1e-6, atol=1e-6)
