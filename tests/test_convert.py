"""tritonbn.convert on real and hand-built models: same numbers, same parameters, only the class
of each torch BatchNorm1d/2d changes."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torchvision
from torch import nn

import tritonbn

from .helpers import assert_close


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and parameter gradients of ``sum(output * fixed weights)``."""
    model.zero_grad()
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    return y.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet18_same_outputs_gradients_and_buffers(training):
    original = resnet18().train(training)
    converted = tritonbn.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, 32, 32)
    y, grads = forward_backward(original, x)
    y_c, grads_c = forward_backward(converted, x)
    torch.testing.assert_close(y_c, y)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, msg=name)
    for (name, buf), (name_c, buf_c) in zip(original.named_buffers(), converted.named_buffers(), strict=True):
        assert name == name_c
        torch.testing.assert_close(buf_c, buf, msg=name)


def test_resnet18_every_batchnorm_converted_in_place():
    model = resnet18()
    batchnorms = [name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    assert len(batchnorms) == 20
    modules_before = dict(model.named_modules())
    assert tritonbn.convert(model) is model
    modules_after = dict(model.named_modules())
    assert modules_after.keys() == modules_before.keys()
    for name, module in modules_after.items():
        assert module is modules_before[name]  # same objects: the swap only changes the class
        if name in batchnorms:
            assert type(module) is tritonbn.BatchNorm2d
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_keeps_parameters_requires_grad_dtype_and_mode():
    model = resnet18().double()
    model.bn1.weight.requires_grad_(False)
    model.layer1.eval()
    params_before = dict(model.named_parameters())
    buffers_before = dict(model.named_buffers())
    flags_before = {name: p.requires_grad for name, p in params_before.items()}
    modes_before = {name: m.training for name, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    tritonbn.convert(model)

    for name, param in model.named_parameters():
        assert param is params_before[name], name
        assert param.requires_grad == flags_before[name], name
        assert param.dtype == torch.float64 and param.device.type == "cpu"
    for name, buf in model.named_buffers():
        assert buf is buffers_before[name], name
    assert {name: m.training for name, m in model.named_modules()} == modes_before
    assert not model.bn1.weight.requires_grad
    # An optimizer built before the conversion still steps the model's parameters.
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    before = model.bn1.bias.detach().clone()
    optimizer.step()
    assert not torch.equal(model.bn1.bias, before)
    assert model.bn1.weight.grad is None


class Nested(nn.Module):
    """BatchNorms at several depths, in a ModuleList, a ModuleDict and a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
        self.blocks = nn.ModuleList([nn.BatchNorm2d(4), nn.ModuleDict({"deep": nn.BatchNorm2d(4)})])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.blocks[1]["deep"](self.blocks[0](x))
        return self.head(x)


def test_nested_modules_and_batchnorm1d():
    model = Nested()
    reference_model = copy.deepcopy(model)
    tritonbn.convert(model)
    assert type(model.features[1][0]) is tritonbn.BatchNorm2d
    assert type(model.blocks[0]) is tritonbn.BatchNorm2d
    assert type(model.blocks[1]["deep"]) is tritonbn.BatchNorm2d
    assert type(model.head[2]) is tritonbn.BatchNorm1d
    assert model.head[2].momentum is None
    x = torch.randn(3, 2, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(model(x), reference_model(x))
    torch.testing.assert_close(model.head[2].running_var, reference_model.head[2].running_var)


def test_leaves_subclasses_and_converted_modules_alone():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBatchNorm(3), tritonbn.BatchNorm2d(3), nn.BatchNorm2d(3))
    tritonbn.convert(model)
    assert [type(m) for m in model] == [MyBatchNorm, tritonbn.BatchNorm2d, tritonbn.BatchNorm2d]


def test_keeps_hooks():
    model = nn.Sequential(nn.BatchNorm2d(3))
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(type(module)))
    tritonbn.convert(model)
    model(torch.randn(2, 3, 2, 2))
    assert seen == [tritonbn.BatchNorm2d]


@pytest.mark.skipif(
    "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
    reason="this torch's BatchNorm has no 'bias' option",
)
def test_batchnorm_without_bias_keeps_computing_the_same():
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False))
    reference_model = copy.deepcopy(model)
    tritonbn.convert(model)
    assert model[0].bias is None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(model(x), reference_model(x))
    torch.testing.assert_close(model[0].running_mean, reference_model[0].running_mean)


def test_converts_a_bare_batchnorm():
    module = nn.BatchNorm1d(4)
    assert tritonbn.convert(module) is module
    assert type(module) is tritonbn.BatchNorm1d


@pytest.mark.parametrize("not_a_module", [torch.randn(2), "resnet18", None, [nn.BatchNorm2d(2)]])
def test_rejects_non_modules(not_a_module):
    with pytest.raises(TypeError, match=r"'module'.*torch\.nn\.Module.*got"):
        tritonbn.convert(not_a_module)


@pytest.mark.interpreter
def test_resnet18_stem_on_triton_backend_matches_torch():
    """The converted resnet18 in training mode on the kernels (the interpreter on CPU).

    Runs the network up to layer1 (five BatchNorm2d): the full network's last stages reduce a
    (2, 3, 16, 16) input to one value per image per channel, where batch norm is so ill-conditioned
    that torch's own float32 and float64 results differ by ~0.5, and the interpreter would spend
    about a minute on its 4,800 channel programs.
    """
    original = resnet18()
    converted = tritonbn.convert(copy.deepcopy(original))

    def stem(model: nn.Module) -> nn.Module:
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)

    x = torch.randn(2, 3, 16, 16)
    y, grads = forward_backward(stem(original), x)
    with tritonbn.backend("triton"):
        y_c, grads_c = forward_backward(stem(converted), x)
    assert_close(y_c, y, torch.float32, "output")
    for name, grad in grads.items():
        # The loss sums 2·64·4·4 outputs; each gradient sums over as many elements.
        assert_close(grads_c[name], grad, torch.float32, f"grad {name}", reduced=y.numel())
    assert_close(
        converted.layer1[1].bn2.running_var, original.layer1[1].bn2.running_var, torch.float32, "running_var"
    )
