"""Batch norm with a fused activation: the Triton kernels (every plan, train and eval, forward,
backward and running statistics) and the torch/reference backends against batch norm followed by
torch's activation in float64; the modules' ``activation`` option; ``convert(fuse_activations=True)``
on the seed notebook's LeNet; and the argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn.kernels.activation import ACTIVATIONS

from .kernel_cases import TOLERANCES, assert_step_close, make_inputs, reference_step, run_step

# Each activation with the options it is run with: leaky_relu with a slope other than its default.
CASES = [(name, 0.2 if name == "leaky_relu" else 0.01) for name in ACTIVATIONS]
CASE_IDS = [name for name, _ in CASES]

# (shape, channels_last) per plan, ragged sizes: each split-welford channel (1,763 elements) spreads
# over two programs, a full and a ragged tile; the column-tiled rows (576) over two row blocks.
PLAN_SHAPES = {
    "fused-small": ((6, 3, 5, 7), False),
    "split-welford": ((1, 2, 41, 43), False),
    "column-tiled": ((9, 5, 8, 8), True),
    "eval": ((5, 3, 4, 5), False),
}


def _reduced(shape: tuple[int, ...]) -> int:
    return math.prod(shape) // shape[1]


@pytest.mark.parametrize("plan", list(PLAN_SHAPES))
@pytest.mark.parametrize("activation, slope", CASES, ids=CASE_IDS)
def test_kernels_match_batch_norm_then_activation(activation, slope, plan, device):
    shape, channels_last = PLAN_SHAPES[plan]
    training = plan != "eval"
    # offset 0.3: z lands on both sides of every activation's kink or bend.
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last, offset=0.3)
    options = {"training": training, "activation": activation, "negative_slope": slope}
    got = run_step(inputs, backend="triton", plan=plan, **options)
    want = reference_step(inputs, **options)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))
    # The activation changed the result: it was not silently skipped.
    plain = reference_step(inputs, training=training)
    assert not torch.allclose(got.y.double().cpu(), plain.y.cpu(), atol=1e-3)


@pytest.mark.parametrize("plan", list(PLAN_SHAPES))
@pytest.mark.parametrize("activation, slope", CASES, ids=CASE_IDS)
def test_a_nan_comes_through_as_in_torch(activation, slope, plan, device):
    # One NaN in channel 1: in training its channel's statistics are NaN, in eval only its element.
    # relu(NaN) is NaN, not 0, and relu's backward passes dy where its input is NaN, as torch's do;
    # every other element and channel is unaffected.
    shape, channels_last = PLAN_SHAPES[plan]
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last, offset=0.3)
    inputs["x"][(0, 1) + (0,) * (len(shape) - 2)] = float("nan")
    options = {"training": plan != "eval", "activation": activation, "negative_slope": slope}
    got = run_step(inputs, backend="triton", plan=plan, **options)
    want = reference_step(inputs, **options)
    rtol, atol = TOLERANCES[torch.float32]
    for name in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        mine, theirs = getattr(got, name).double().cpu(), getattr(want, name).cpu()
        torch.testing.assert_close(
            mine, theirs, rtol=rtol, atol=atol * 8, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert got.y.isnan().any() and not got.y[:, 0].isnan().any()


@pytest.mark.parametrize("plan", ["fused-small", "split-welford"])
def test_half_input(plan, device):
    shape = (6, 3, 7, 7)
    inputs = make_inputs(shape, torch.float16, device)
    got = run_step(inputs, backend="triton", plan=plan, activation="silu")
    assert got.y.dtype == torch.float16 and got.dx.dtype == torch.float16
    want = reference_step(inputs, activation="silu")
    assert_step_close(got, want, torch.float16, reduced=_reduced(shape))


@pytest.mark.parametrize("plan", ["fused-small", "split-welford", "column-tiled", "eval"])
@pytest.mark.parametrize(
    "need_input, need_params, affine", [(True, False, True), (False, True, True), (True, False, False)]
)
def test_gradient_subsets_and_no_affine(plan, need_input, need_params, affine, device):
    shape = (5, 3, 4, 4)
    training = plan != "eval"
    inputs = make_inputs(shape, torch.float32, device, channels_last=plan == "column-tiled")
    options = {
        "training": training,
        "need_input": need_input,
        "need_params": need_params,
        "affine": affine,
        "activation": "sigmoid",
    }
    got = run_step(inputs, backend="triton", plan=plan, **options)
    want = reference_step(inputs, **options)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


def test_int64_offsets_forced(device):
    from tritonbn import kernels

    inputs = make_inputs((5, 3, 7, 7), torch.float32, device)
    want = reference_step(inputs, affine=False, running=False, activation="tanh")
    for plan in ("split-welford", "fused-small"):
        y, save = kernels.forward_train(
            inputs["x"],
            None,
            None,
            None,
            None,
            0.1,
            1e-5,
            plan=plan,
            sm_count=4,
            force_int64=True,
            activation="tanh",
        )
        torch.testing.assert_close(y.double(), want.y, rtol=1e-5, atol=1e-5)
        dx, _, _ = kernels.backward_train(
            inputs["grad"].float(),
            inputs["x"],
            None,
            save,
            (True, False, False),
            plan=plan,
            sm_count=4,
            force_int64=True,
            activation="tanh",
        )
        torch.testing.assert_close(dx.double(), want.dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation, slope", CASES, ids=CASE_IDS)
def test_other_backends_apply_the_torch_activation(backend, training, activation, slope):
    inputs = make_inputs((4, 3, 3, 3), torch.float64, "cpu", offset=0.3)
    options = {"training": training, "activation": activation, "negative_slope": slope}
    got = run_step(inputs, backend=backend, **options)
    want = reference_step(inputs, **options)
    for name in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(got, name),
            getattr(want, name),
            rtol=1e-10,
            atol=1e-10,
            msg=lambda m, name=name: f"{name}: {m}",
        )


# Modules


@pytest.mark.parametrize(
    "module, torch_module, shape",
    [
        (
            tritonbn.BatchNorm2d(3, activation="relu"),
            nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()),
            (4, 3, 5, 5),
        ),
        (
            tritonbn.BatchNorm1d(4, activation="leaky_relu", negative_slope=0.3),
            nn.Sequential(nn.BatchNorm1d(4), nn.LeakyReLU(0.3)),
            (6, 4),
        ),
        (
            tritonbn.BatchNorm(5, 2, activation="sigmoid"),
            nn.Sequential(nn.BatchNorm1d(5), nn.Sigmoid()),
            (7, 5),
        ),
    ],
    ids=["2d-relu", "1d-leaky", "seed-sigmoid"],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_modules_equal_batch_norm_then_activation(module, torch_module, shape, backend):
    module, torch_module = copy.deepcopy(module), copy.deepcopy(torch_module)
    assert module.state_dict().keys() == torch_module[0].state_dict().keys()
    x = make_inputs(shape, torch.float32, "cpu", offset=0.3)["x"]
    for training in (True, True, False):
        module.train(training)
        torch_module.train(training)
        with tritonbn.backend(backend):
            y = module(x)
        torch.testing.assert_close(y, torch_module(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.running_var, torch_module[0].running_var, rtol=1e-5, atol=1e-6)
    assert int(module.num_batches_tracked) == 2


def test_module_repr_names_the_activation_only_when_set():
    assert repr(tritonbn.BatchNorm2d(3)) == repr(nn.BatchNorm2d(3))
    assert repr(tritonbn.BatchNorm2d(3, activation="relu")).endswith(
        "track_running_stats=True, activation='relu')"
    )
    assert "negative_slope=0.2)" in repr(tritonbn.BatchNorm1d(3, activation="leaky_relu", negative_slope=0.2))
    assert "activation='silu', num_dims=4" in repr(tritonbn.BatchNorm(3, 4, activation="silu"))


def test_module_activation_survives_deepcopy_and_state_dict_round_trip():
    module = tritonbn.BatchNorm2d(3, activation="tanh")
    module(torch.randn(4, 3, 2, 2))
    clone = copy.deepcopy(module)
    assert clone.activation == "tanh"
    fresh = tritonbn.BatchNorm2d(3)
    fresh.load_state_dict(module.state_dict())  # strict: no extra keys
    assert fresh.activation is None


# convert(fuse_activations=True)


def seed_lenet() -> nn.Sequential:
    """The seed notebook's LeNet with torch's BatchNorm: BN -> Sigmoid after every conv/linear."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5),
        nn.BatchNorm2d(6),
        nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.BatchNorm2d(16),
        nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        nn.BatchNorm1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.BatchNorm1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def _forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * weights).sum().backward()
    return y.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_convert_fuses_the_seed_lenet(backend):
    torch.manual_seed(0)
    original = seed_lenet()
    fused = tritonbn.convert(copy.deepcopy(original), fuse_activations=True)
    for index in (2, 6, 11, 14):
        assert type(fused[index]) is nn.Identity
        assert fused[index - 1].activation == "sigmoid"
    assert [type(fused[i]) for i in (1, 5, 10, 13)] == [tritonbn.BatchNorm2d] * 2 + [tritonbn.BatchNorm1d] * 2
    assert fused.state_dict().keys() == original.state_dict().keys()
    # The oracle: the unfused torch.nn model in float64.
    oracle = original.double()
    x = torch.randn(4, 1, 28, 28)
    for training in (True, False):
        oracle.train(training)
        fused.train(training)
        y, grads = _forward_backward(oracle, x.double())
        with tritonbn.backend(backend):
            y_fused, grads_fused = _forward_backward(fused, x)
        torch.testing.assert_close(y_fused.double(), y, rtol=1e-4, atol=1e-5)
        # fp32 rounding through four layers reaches ~3e-5 of the model's largest gradient, in
        # torch.nn's fp32 model as in this one; the conv biases' true gradients (0 under a
        # BatchNorm) are rounding noise on that scale.
        scale = max(grad.abs().max() for grad in grads.values())
        for name, grad in grads.items():
            torch.testing.assert_close(grads_fused[name].double(), grad, rtol=0, atol=1e-4 * scale, msg=name)
    for (name, buf), (_, buf_fused) in zip(oracle.named_buffers(), fused.named_buffers(), strict=True):
        torch.testing.assert_close(buf_fused.double(), buf.double(), rtol=1e-5, atol=1e-6, msg=name)


def test_convert_fuses_every_supported_activation_inplace_or_not():
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(3),
        nn.LeakyReLU(0.25, inplace=True),
        nn.BatchNorm2d(3),
        nn.SiLU(inplace=True),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        tritonbn.BatchNorm2d(3),
        nn.Sigmoid(),
    )
    original = copy.deepcopy(model)
    tritonbn.convert(model, fuse_activations=True)
    assert [m.activation for m in model[0::2]] == ["relu", "leaky_relu", "silu", "tanh", "sigmoid"]
    assert model[2].negative_slope == 0.25
    assert all(type(m) is nn.Identity for m in model[1::2])
    x = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(model(x), original(x))


def test_convert_leaves_unsafe_pairs_unfused():
    class Reordering(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))

    shared = nn.BatchNorm1d(4)
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda module, args, out: None)
    model = nn.Sequential(
        nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.0), nn.ReLU()),  # not adjacent
        nn.Sequential(nn.BatchNorm1d(4), hooked),  # the activation has a hook
        nn.Sequential(shared, nn.ReLU(), shared),  # the BatchNorm is used twice
        Reordering(nn.BatchNorm1d(4), nn.ReLU()),  # a Sequential subclass with its own forward
        nn.Sequential(nn.BatchNorm1d(4), nn.GELU()),  # not a fusable activation
        nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Sigmoid()),  # fused once, not twice
    )
    tritonbn.convert(model, fuse_activations=True)
    for block in list(model)[:5]:
        assert all(getattr(m, "activation", None) is None for m in block)
        assert not any(type(m) is nn.Identity for m in block)
    assert model[5][0].activation == "relu"
    assert [type(m) for m in model[5]][1:] == [nn.Identity, nn.Sigmoid]


def test_convert_fuses_into_a_memory_efficient_batchnorm_only_what_it_can_invert():
    model = nn.Sequential(
        tritonbn.BatchNorm2d(3, memory_efficient=True),
        nn.ReLU(),  # not invertible: left as it is
        tritonbn.BatchNorm2d(3, memory_efficient=True),
        nn.LeakyReLU(0.0),  # a zero slope is not invertible either
        tritonbn.BatchNorm2d(3, memory_efficient=True),
        nn.LeakyReLU(0.2),
    )
    original = copy.deepcopy(model)
    tritonbn.convert(model, fuse_activations=True)
    assert [m.activation for m in model[0::2]] == [None, None, "leaky_relu"]
    assert [type(m) for m in model[1::2]] == [nn.ReLU, nn.LeakyReLU, nn.Identity]
    assert model[4].negative_slope == 0.2
    x = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(model(x), original(x))


def test_convert_does_not_fuse_by_default():
    model = tritonbn.convert(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    assert model[0].activation is None and type(model[1]) is nn.ReLU


# Errors


@pytest.mark.parametrize("activation", ["gelu", "ReLU", "", 1, nn.ReLU()])
def test_unknown_activation_is_rejected(activation):
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"'activation'.*'relu'.*'sigmoid'.*'leaky_relu'.*'silu'"):
        tritonbn.batch_norm(
            torch.randn(4, 3), running_mean, running_var, training=True, activation=activation
        )
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
    with pytest.raises(ValueError, match="'activation'"):
        tritonbn.BatchNorm1d(3, activation=activation)


@pytest.mark.parametrize(
    "slope, error",
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_negative_slope_is_rejected(slope, error):
    with pytest.raises(error, match="'negative_slope'"):
        tritonbn.batch_norm(
            torch.randn(4, 3), None, None, training=True, activation="leaky_relu", negative_slope=slope
        )
    with pytest.raises(error, match="'negative_slope'"):
        tritonbn.BatchNorm2d(3, activation="leaky_relu", negative_slope=slope)


def test_module_with_a_bad_activation_attribute_changes_no_state():
    module = tritonbn.BatchNorm1d(3)
    module.activation = "softplus"
    with pytest.raises(ValueError, match="'activation'"):
        module(torch.randn(4, 3))
    assert int(module.num_batches_tracked) == 0
    assert torch.equal(module.running_mean, torch.zeros(3))


def test_activation_is_keyword_only():
    with pytest.raises(TypeError):
        tritonbn.batch_norm(torch.randn(4, 3), None, None, None, None, True, 0.1, 1e-5, "relu")


def test_convert_rejects_a_non_bool_fuse_flag():
    with pytest.raises(TypeError, match="'fuse_activations'"):
        tritonbn.convert(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), fuse_activations="yes")
