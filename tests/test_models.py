"""The seed notebook's LeNet: its layers, and the same numbers with tritonbn's or torch's BatchNorm."""

import contextlib

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn.models import LeNet


def seed_notebook_net() -> nn.Sequential:
    """The notebook's second net (torch's BatchNorm), written out as in the notebook."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.BatchNorm2d(6),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, 5),
        nn.BatchNorm2d(16),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        nn.BatchNorm1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.BatchNorm1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


@pytest.mark.parametrize("batch_norm", ["tritonbn", "torch"])
def test_layers_match_the_seed_notebook(batch_norm):
    net, seed = LeNet(batch_norm), seed_notebook_net()
    assert [type(m).__name__ for m in net] == [type(m).__name__ for m in seed]
    shapes = {key: value.shape for key, value in net.state_dict().items()}
    assert shapes == {key: value.shape for key, value in seed.state_dict().items()}


def test_batch_norm_classes_follow_the_choice():
    triton_net, torch_net = LeNet("tritonbn"), LeNet("torch")
    bn_layers = (1, 5, 10, 13)
    assert [type(triton_net[i]) for i in bn_layers] == [tritonbn.BatchNorm2d] * 2 + [tritonbn.BatchNorm1d] * 2
    assert [type(torch_net[i]) for i in bn_layers] == [nn.BatchNorm2d] * 2 + [nn.BatchNorm1d] * 2


def test_unknown_batch_norm_is_refused():
    with pytest.raises(ValueError, match="tritonbn, torch"):
        LeNet("cudnn")


def test_triton_kernels_and_torch_nets_agree(device):
    """Same seed, same weights: tritonbn's LeNet on its Triton kernels (through Triton's interpreter
    on a CPU) and torch's give the same loss, gradients and running statistics to float32
    tolerance."""
    x = torch.rand(16, 1, 28, 28, device=device)
    target = torch.randint(0, 10, (16,), device=device)
    results = []
    for batch_norm, forced in (("tritonbn", "triton"), ("torch", None)):
        torch.manual_seed(3)
        net = LeNet(batch_norm).to(device)
        with tritonbn.backend(forced) if forced else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(net(x), target)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()], net.state_dict()))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-5)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_reference_backend_matches_torch():
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    nets, outputs = [], []
    for forced in (None, "reference"):
        torch.manual_seed(5)
        net = LeNet("tritonbn").double()
        if forced is None:
            outputs.append(net(x))
        else:
            with tritonbn.backend(forced):
                outputs.append(net(x))
        nets.append(net)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    for key, value in nets[0].state_dict().items():
        torch.testing.assert_close(nets[1].state_dict()[key], value, rtol=1e-10, atol=1e-12)
