"""Every torch BatchNorm user's path works on tritonbn: BatchNorm3d, the Lazy modules, torchvision's
FrozenBatchNorm2d, the inputs torch accepts (numpy sizes, eps=0, tensor momentum), explain() on bad
input, torch.jit.script (a clear refusal), torch.export, and torch's own convert_sync_batchnorm and
conv/linear-BatchNorm folding."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn

from .helpers import (
    BACKENDS,
    assert_close,
    assert_modules_match,
    assert_unchanged,
    randomize_state,
    snapshot,
    twin_modules,
)

# ---------------------------------------------------------------------------------------------
# BatchNorm3d

SHAPES_3D = [(3, 5, 3, 2, 5), (2, 3, 1, 7, 3), (4, 2, 2, 3, 1)]
PLANS_3D = [
    ("torch", None),
    ("reference", None),
    ("triton", None),
    ("triton", "fused-small"),
    ("triton", "split-welford"),
]


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last_3d) if channels_last else x.contiguous()


@pytest.mark.parametrize(("backend", "plan"), PLANS_3D, ids=[f"{b}-{p}" for b, p in PLANS_3D])
@pytest.mark.parametrize("shape", SHAPES_3D, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last_3d"])
def test_batchnorm3d_matches_torch_over_train_and_eval_steps(backend, plan, shape, channels_last):
    # The kernels run float32 (float64 goes to torch); the oracle is torch's module in float64.
    dtype = torch.float64 if backend != "triton" else torch.float32
    module, oracle = twin_modules(tritonbn.BatchNorm3d, nn.BatchNorm3d, shape[1], dtype)
    gen = torch.Generator().manual_seed(sum(shape))
    with tritonbn.backend(backend, plan=plan):
        for training in (True, True, False):
            module.train(training)
            oracle.train(training)
            x = memory_format(3 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64), channels_last)
            dy = memory_format(torch.randn(shape, generator=gen, dtype=torch.float64), channels_last)
            assert_modules_match(module, oracle, x, dy, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm3d_channels_last_3d_output_like_torch(training):
    x = torch.randn(2, 3, 2, 3, 4).to(memory_format=torch.channels_last_3d)
    module = tritonbn.BatchNorm3d(3).train(training)
    expected = nn.BatchNorm3d(3).train(training)(x)
    assert expected.is_contiguous(memory_format=torch.channels_last_3d)
    with tritonbn.backend("triton"):
        plan = tritonbn.explain(x, training=training)
        y = module(x)
    assert plan.backend == "triton" and plan.facts["layout"] == "channels_last"
    assert not plan.copies_input
    assert y.stride() == expected.stride()
    assert_close(y, expected, torch.float32, "output")


def test_batchnorm3d_is_torch_batchnorm3d_with_the_same_state_dict():
    module = tritonbn.BatchNorm3d(4, momentum=None, affine=False)
    assert isinstance(module, nn.BatchNorm3d)
    assert repr(module) == repr(nn.BatchNorm3d(4, momentum=None, affine=False))
    assert module.state_dict().keys() == nn.BatchNorm3d(4, momentum=None, affine=False).state_dict().keys()


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 1, 2, 2, 2), (2, 3)], ids=str)
def test_batchnorm3d_rejects_other_dims(shape):
    expected = rf"BatchNorm3d: 'input' must be 5D \(N, C, D, H, W\), got a {len(shape)}D"
    with pytest.raises(ValueError, match=expected):
        tritonbn.BatchNorm3d(3)(torch.randn(shape))


# ---------------------------------------------------------------------------------------------
# The output's memory format


def _transposed_1d():
    return torch.randn(4, 5, 3).transpose(1, 2)  # (N, C=3, L=5) as in bn(x.transpose(1, 2))


def _transposed_2d():
    return torch.randn(3, 6).t()  # (N=6, C=3) with unit stride along N


def _permuted_4d():
    return torch.randn(3, 4, 5, 6).permute(1, 0, 2, 3)  # (N=4, C=3, H, W), C outermost


def _sliced_channels_last():
    # Not dense (every other row), channels_last-like strides: torch keeps channels_last.
    return torch.randn(4, 3, 10, 6).contiguous(memory_format=torch.channels_last)[:, :, ::2]


def _sliced_contiguous():
    return torch.randn(4, 3, 5, 12)[..., ::3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "make", [_transposed_1d, _transposed_2d, _permuted_4d, _sliced_channels_last, _sliced_contiguous]
)
def test_output_and_input_gradient_have_torchs_strides(backend, training, make):
    # torch writes y and dx in the input's suggested memory format, whatever its strides; the
    # kernels write in their input's, so a layout torch does not keep runs on a copy in torch's.
    x = make()
    cls, torch_cls = (
        (tritonbn.BatchNorm1d, nn.BatchNorm1d) if x.dim() < 4 else (tritonbn.BatchNorm2d, nn.BatchNorm2d)
    )
    module, oracle = cls(3).train(training), torch_cls(3).train(training)
    results = []
    for bn in (module, oracle):
        leaf = x.detach().requires_grad_()  # x's strides, as they are
        with tritonbn.backend(backend if bn is module else "auto"):
            y = bn(leaf)
        (dx,) = torch.autograd.grad(y, leaf, torch.ones_like(y) + y.detach())
        results.append((y, dx))
    (y, dx), (want_y, want_dx) = results
    for got, want in ((y, want_y), (dx, want_dx)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # Strides of size-1 dims address nothing: only the others must agree.
        assert [st for size, st in zip(got.shape, got.stride(), strict=True) if size > 1] == [
            st for size, st in zip(want.shape, want.stride(), strict=True) if size > 1
        ]


# ---------------------------------------------------------------------------------------------
# Lazy modules

LAZY = [
    (tritonbn.LazyBatchNorm1d, nn.LazyBatchNorm1d, tritonbn.BatchNorm1d, (5, 3, 4)),
    (tritonbn.LazyBatchNorm2d, nn.LazyBatchNorm2d, tritonbn.BatchNorm2d, (3, 4, 3, 2)),
    (tritonbn.LazyBatchNorm3d, nn.LazyBatchNorm3d, tritonbn.BatchNorm3d, (2, 3, 2, 3, 2)),
]
LAZY_IDS = ["1d", "2d", "3d"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("cls", "torch_cls", "becomes", "shape"), LAZY, ids=LAZY_IDS)
def test_lazy_becomes_tritonbn_at_first_input_and_matches_torch(backend, cls, torch_cls, becomes, shape):
    dtype = torch.float64 if backend != "triton" else torch.float32
    module = cls(momentum=0.3, dtype=dtype)
    oracle = torch_cls(momentum=0.3, dtype=torch.float64)
    assert isinstance(module, torch_cls) and module.has_uninitialized_params()
    # Like torch's Lazy module, not yet a BatchNormXd (init loops over BatchNormXd skip it).
    torch_becomes = torch_cls.cls_to_become
    assert not isinstance(module, (torch_becomes, becomes)) and not isinstance(oracle, torch_becomes)
    x = 1 + torch.randn(shape, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    with tritonbn.backend(backend):
        # The first call materializes and already runs tritonbn (its plan, its checks).
        assert_modules_match(module, oracle, x, dy, dtype)
        assert type(module) is becomes and module.num_features == shape[1]
        assert isinstance(module, torch_becomes)
        module.eval()
        oracle.eval()
        assert_modules_match(module, oracle, x + 1, dy, dtype)


@pytest.mark.interpreter
def test_lazy_activation_applies_from_the_first_call():
    module = tritonbn.LazyBatchNorm2d(activation="relu")
    x = torch.randn(4, 3, 2, 2)
    expected = torch.relu(F.batch_norm(x, None, None, training=True))
    with tritonbn.backend("triton"):
        torch.testing.assert_close(module(x), expected)
    assert type(module) is tritonbn.BatchNorm2d and module.activation == "relu"


def test_lazy_loads_a_torch_state_dict():
    source = nn.BatchNorm2d(3)
    randomize_state(source)
    module = tritonbn.LazyBatchNorm2d()
    module.load_state_dict(source.state_dict())
    module.eval()
    source.eval()
    x = torch.randn(2, 3, 4, 4)
    with tritonbn.backend("reference"):
        y = module(x)
    torch.testing.assert_close(y, source(x))
    assert type(module) is tritonbn.BatchNorm2d


@pytest.mark.skipif(not tritonbn._compat.BATCHNORM_HAS_BIAS_ARG, reason="this torch has no bias= option")
def test_lazy_without_bias():
    module = tritonbn.LazyBatchNorm1d(bias=False)
    module(torch.randn(4, 3))
    assert module.bias is None and module.weight.shape == (3,)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"momentum": 2.0}, ValueError, r"'momentum' must be in \[0, 1\] or None, got 2\.0"),
        ({"eps": -1.0}, ValueError, r"'eps' must be a finite number >= 0, got -1\.0"),
        ({"activation": "gelu"}, ValueError, r"'activation' must be None or one of"),
    ],
)
def test_lazy_rejects_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        tritonbn.LazyBatchNorm2d(**options)


@pytest.mark.parametrize(("cls", "torch_cls", "becomes", "shape"), LAZY, ids=LAZY_IDS)
def test_convert_turns_torch_lazy_into_tritonbn_lazy(cls, torch_cls, becomes, shape):
    # (A Lazy module cannot be deep-copied before it is materialized: build the twin again.)
    model, reference_model = (nn.Sequential(torch_cls(momentum=None), nn.ReLU()) for _ in range(2))
    tritonbn.convert(model, fuse_activations=True)
    assert type(model[0]) is cls and model[0].activation == "relu"
    x = torch.randn(shape)
    for _ in range(2):
        torch.testing.assert_close(model(x), reference_model(x))
    assert type(model[0]) is becomes
    torch.testing.assert_close(model[0].running_var, reference_model[0].running_var)
    assert torch.equal(model[0].num_batches_tracked, reference_model[0].num_batches_tracked)


def test_convert_materialized_lazy_is_a_plain_batchnorm():
    model = nn.Sequential(nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 2, 2))
    tritonbn.convert(model)
    assert type(model[0]) is tritonbn.BatchNorm2d


# ---------------------------------------------------------------------------------------------
# torchvision's FrozenBatchNorm2d


def frozen_twins(channels: int, eps: float = 1e-5) -> tuple[nn.Module, nn.Module]:
    """(torchvision's FrozenBatchNorm2d with random state, a converted float64 copy of it)."""
    misc = pytest.importorskip("torchvision.ops.misc")
    original = misc.FrozenBatchNorm2d(channels, eps=eps).double()
    gen = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        original.weight.copy_(1 + 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64))
        original.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        original.running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        original.running_var.copy_(0.5 + torch.rand(channels, generator=gen, dtype=torch.float64))
    return original, tritonbn.convert(copy.deepcopy(original))


def frozen_step(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, input gradient) of ``module`` on ``x`` and ``dy`` cast to ``dtype``."""
    x = x.detach().to(dtype).requires_grad_(True)
    y = module(x)
    (dx,) = torch.autograd.grad(y, [x], dy.to(y.dtype))
    return y.detach(), dx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_frozen_matches_torchvision(backend, training, channels_last):
    original, converted = frozen_twins(5, eps=1e-3)
    assert type(converted) is tritonbn.FrozenBatchNorm2d
    dtype = torch.float64 if backend != "triton" else torch.float32
    converted.to(dtype).train(training)
    before = snapshot(*converted.buffers())
    x = torch.randn(3, 5, 4, 3, dtype=torch.float64)
    dy = torch.randn(3, 5, 4, 3, dtype=torch.float64)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    want = frozen_step(original, x, dy, torch.float64)
    with tritonbn.backend(backend):
        got = frozen_step(converted, x, dy, dtype)
    assert got[0].dtype == dtype and got[0].stride() == x.stride()
    assert_close(got[0], want[0], dtype, "output")
    assert_close(got[1], want[1], dtype, "grad input")
    for kept, buffer in zip(before, converted.buffers(), strict=True):
        assert torch.equal(kept, buffer), "a frozen module's buffers never change"


FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("buffer_dtype", FLOATS, ids=str)
def test_frozen_promotes_dtypes_as_torchvision_does(backend, input_dtype, buffer_dtype):
    # torchvision computes x·scale + shift in the promotion of the input's and the buffers'
    # dtypes; tritonbn does the same wherever batch_norm's own rule would refuse the pair. The
    # documented exception: half input with float32 buffers keeps the input's dtype.
    original, converted = frozen_twins(3)
    original, converted = original.to(buffer_dtype), converted.to(buffer_dtype)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).to(input_dtype)
    want = original(x)
    with tritonbn.backend(backend):
        got = converted(x)
    keeps_half = input_dtype in (torch.float16, torch.bfloat16) and buffer_dtype == torch.float32
    assert got.dtype == (input_dtype if keeps_half else want.dtype)
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)


def test_frozen_converted_in_place_keeps_state_and_keys():
    original, _ = frozen_twins(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), original)
    keys = model.state_dict().keys()
    buffers = dict(model.named_buffers())
    tritonbn.convert(model)
    assert model[1] is original and type(original) is tritonbn.FrozenBatchNorm2d
    assert model.state_dict().keys() == keys
    assert all(buf is buffers[name] for name, buf in model.named_buffers())
    assert original.num_features == 4 and original.eps == 1e-5
    assert repr(original) == "FrozenBatchNorm2d(4, eps=1e-05)"


def test_frozen_loads_torch_batchnorm_state_dict_dropping_the_counter():
    source = nn.BatchNorm2d(3)
    randomize_state(source)
    module = tritonbn.FrozenBatchNorm2d(3)
    module.load_state_dict(source.state_dict(), strict=True)
    source.eval()
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(module(x), source(x))
    assert "num_batches_tracked" not in module.state_dict()


@pytest.mark.interpreter
def test_frozen_fuses_a_following_relu():
    original, _ = frozen_twins(3)
    model = nn.Sequential(original.float(), nn.ReLU())
    expected = model(x := torch.randn(2, 3, 4, 4))
    tritonbn.convert(model, fuse_activations=True)
    assert model[0].activation == "relu" and isinstance(model[1], nn.Identity)
    with tritonbn.backend("triton"):
        assert_close(model(x), expected, torch.float32, "output")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: tritonbn.FrozenBatchNorm2d(0), ValueError, r"'num_features' must be a positive int, got 0"),
        (lambda: tritonbn.FrozenBatchNorm2d(3, eps=-1.0), ValueError, r"'eps' must be a finite number >= 0"),
        (
            lambda: tritonbn.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4)),
            ValueError,
            r"FrozenBatchNorm2d: 'input' must be 4D \(N, C, H, W\), got a 3D tensor",
        ),
        (
            lambda: tritonbn.FrozenBatchNorm2d(3)(torch.randn(2, 4, 2, 2)),
            RuntimeError,
            r"FrozenBatchNorm2d: 'input' must have num_features=3 channels in dim 1, got 4",
        ),
    ],
)
def test_frozen_rejects_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_convert_does_not_need_torchvision():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import torch, tritonbn\n"
        "m = tritonbn.convert(torch.nn.Sequential(torch.nn.BatchNorm3d(2)))\n"
        "assert type(m[0]) is tritonbn.BatchNorm3d\n"
        "assert 'torchvision.ops.misc' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# Inputs torch accepts


class Index:
    """An integral type that is not an int: torch takes anything with __index__."""

    def __index__(self) -> int:
        return 3


@pytest.mark.parametrize(
    "num_features",
    [np.int64(3), np.int32(3), torch.tensor(3), Index()],
    ids=["np.int64", "np.int32", "tensor", "__index__"],
)
@pytest.mark.parametrize(
    "cls",
    [
        tritonbn.BatchNorm1d,
        tritonbn.BatchNorm2d,
        tritonbn.BatchNorm3d,
        tritonbn.SyncBatchNorm,
        tritonbn.FrozenBatchNorm2d,
    ],
)
def test_integral_num_features_like_torch(cls, num_features):
    module = cls(num_features)
    assert type(module.num_features) is int and module.num_features == 3
    assert module.running_mean.shape == (3,)
    if cls is not tritonbn.FrozenBatchNorm2d:
        assert repr(module).startswith(f"{cls.__name__}(3, eps=1e-05")


@pytest.mark.parametrize("num_features", [True, 3.0, "3", None])
def test_non_integral_num_features_rejected(num_features):
    with pytest.raises(ValueError, match=r"'num_features' must be a positive int, got"):
        tritonbn.BatchNorm2d(num_features)


@pytest.mark.parametrize(
    ("cls", "torch_cls", "shape"),
    [
        (tritonbn.BatchNorm1d, nn.BatchNorm1d, (4, 3)),
        (tritonbn.BatchNorm2d, nn.BatchNorm2d, (4, 3, 2, 2)),
        (tritonbn.BatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 2, 1)),
    ],
    ids=["1d", "2d", "3d"],
)
@pytest.mark.parametrize("backend", BACKENDS)
# With eps=0 the eval kernel's masked lanes (variance loaded as 0) hold rsqrt(0) = inf; never stored.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_eps_zero_builds_and_runs_where_torch_runs(cls, torch_cls, shape, backend):
    module, oracle = cls(3, eps=0), torch_cls(3, eps=0)
    assert module.eps == 0 and repr(module) == repr(oracle)
    randomize_state(module)
    randomize_state(oracle)
    x = torch.randn(shape)
    for training in (True, False):
        module.train(training)
        oracle.train(training)
        try:
            expected = oracle(x)
        except ValueError:
            before = snapshot(*module.buffers())
            with tritonbn.backend(backend), pytest.raises(ValueError, match=r"'eps' must be a finite number"):
                module(x)
            for kept, buffer in zip(before, module.buffers(), strict=True):
                assert torch.equal(kept, buffer)
        else:
            with tritonbn.backend(backend):
                assert_close(module(x), expected, torch.float32, "output")
    # torch 2.14 and earlier refuse eps=0 in training.
    with pytest.raises(ValueError):
        oracle.train()(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "momentum",
    [torch.tensor(0.25), torch.tensor(1), torch.tensor(0.5, dtype=torch.float64)],
    ids=["float32", "int64", "float64"],
)
def test_zero_dim_tensor_momentum_like_torch(backend, training, momentum):
    x = torch.randn(5, 3, 4)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    expected_mean, expected_var = mean.clone(), var.clone()
    expected = F.batch_norm(x, expected_mean, expected_var, training=training, momentum=momentum)
    with tritonbn.backend(backend):
        y = tritonbn.batch_norm(x, mean, var, training=training, momentum=momentum)
    assert_close(y, expected, torch.float32, "output")
    assert_close(mean, expected_mean, torch.float32, "running_mean")
    assert_close(var, expected_var, torch.float32, "running_var")


@pytest.mark.parametrize(
    ("momentum", "error", "match"),
    [
        (
            torch.tensor([0.1]),
            TypeError,
            r"'momentum' must be a float or a 0-D real tensor, got a 1-D float32",
        ),
        (torch.tensor(True), TypeError, r"'momentum' must be a float or a 0-D real tensor, got a 0-D bool"),
        (torch.tensor(1.5), ValueError, r"'momentum' must be in \[0, 1\], got 1\.5"),
    ],
)
def test_bad_tensor_momentum_rejected_and_mutates_nothing(momentum, error, match):
    x, mean, var = torch.randn(4, 3), torch.randn(3), torch.rand(3) + 0.5
    before = snapshot(mean, var)
    with pytest.raises(error, match=match):
        tritonbn.batch_norm(x, mean, var, training=True, momentum=momentum)
    assert torch.equal(before[0], mean) and torch.equal(before[1], var)


# ---------------------------------------------------------------------------------------------
# explain() on input batch_norm rejects

BAD_INPUTS = [
    ("list", lambda: [[1.0, 2.0]], TypeError, r"explain: 'input' must be a torch\.Tensor, got list"),
    (
        "1d",
        lambda: torch.randn(3),
        ValueError,
        r"explain: 'input' must have at least 2 dimensions \(N, C, \*\), got a 1D tensor of shape \(3,\)",
    ),
    (
        "0d",
        lambda: torch.tensor(1.0),
        ValueError,
        r"explain: 'input' must have at least 2 dimensions \(N, C, \*\), got a 0D tensor of shape \(\)",
    ),
    (
        "int64",
        lambda: torch.ones(4, 3, 2, dtype=torch.int64),
        NotImplementedError,
        r"explain: 'input' must be float16, bfloat16, float32 or float64, got int64",
    ),
    (
        "one-value-per-channel",
        lambda: torch.randn(1, 3, 1),
        ValueError,
        r"more than 1 value per channel when training, got input size \(1, 3, 1\)",
    ),
]


@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "reference"])
@pytest.mark.parametrize(
    ("make", "error", "match"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_explain_rejects_what_batch_norm_rejects(backend, make, error, match):
    with pytest.raises(error, match=match):
        tritonbn.explain(make(), backend=backend)
    with tritonbn.backend(backend), pytest.raises(error, match=match.replace("explain:", "batch_norm:")):
        tritonbn.batch_norm(make(), None, None, training=True)


@pytest.mark.interpreter
def test_explain_eval_accepts_one_value_per_channel():
    x = torch.randn(1, 3)
    plan = tritonbn.explain(x, training=False, backend="triton")
    assert plan.kernel == "eval"
    with tritonbn.backend("triton"):
        tritonbn.batch_norm(x, torch.zeros(3), torch.ones(3), training=False)


# ---------------------------------------------------------------------------------------------
# torch.jit.script and torch.export


def scriptable_models() -> dict[str, nn.Module]:
    return {
        "BatchNorm2d": nn.Sequential(nn.Conv2d(3, 3, 1), tritonbn.BatchNorm2d(3)),
        "BatchNorm3d-nested": nn.Sequential(nn.Sequential(tritonbn.BatchNorm3d(3, activation="relu"))),
        "BatchNorm-seed": nn.Sequential(tritonbn.BatchNorm(3, 2)),
        "FrozenBatchNorm2d": nn.Sequential(tritonbn.FrozenBatchNorm2d(3)),
        "SyncBatchNorm": nn.Sequential(tritonbn.SyncBatchNorm(3)),
        "converted": tritonbn.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", list(scriptable_models()))
def test_jit_script_fails_naming_compile_and_export(name):
    model = scriptable_models()[name]
    with pytest.raises(
        RuntimeError,
        match=r"torch\.jit\.script does not support tritonbn.*torch\.compile.*"
        r"torch\.export\.export",
    ):
        torch.jit.script(model)


class Small(nn.Module):
    """Conv → BatchNorm2d(+relu) → BatchNorm3d → Linear → BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2d = tritonbn.BatchNorm2d(4, activation="relu")
        self.bn3d = tritonbn.BatchNorm3d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.bn1d = tritonbn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2d(self.conv(x))
        x = self.bn3d(x.unsqueeze(2)).squeeze(2)
        return self.bn1d(self.fc(x.flatten(1)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_runs_like_eager(backend, training):
    torch.manual_seed(0)
    model = Small().train(training)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            randomize_state(module)
    eager = copy.deepcopy(model)
    x = torch.randn(3, 3, 6, 6)
    with tritonbn.backend(backend):
        program = torch.export.export(model, (x,))
        exported = program.module()
        expected = eager(x)
        y = exported(x)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    if backend == "triton":
        op = "tritonbn.forward_train" if training else "tritonbn.forward_eval"
        assert any(target.startswith(op) for target in targets), targets
    assert_close(y, expected, torch.float32, "output", reduced=64)
    exported_buffers = dict(exported.named_buffers())
    for name, buffer in eager.named_buffers():
        assert_close(exported_buffers[name], buffer, torch.float32, name)


class OnnxBlock(nn.Module):
    """Conv → BatchNorm2d(silu) → conv → BatchNorm2d(relu, residual) → Linear → BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = tritonbn.BatchNorm2d(4, activation="silu")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = tritonbn.BatchNorm2d(4, activation="relu")
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.bn3 = tritonbn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.conv2(y), residual=y)
        return self.bn3(self.fc(y.flatten(1)))


@pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::torch.jit.TracerWarning",
)
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_like_eager(backend, dynamo, device):
    # ONNX has no operator for tritonbn's kernels: both exporters record PyTorch's batch_norm and
    # the activation (torch.export, which the dynamo exporter traces with, keeps the custom ops).
    pytest.importorskip("onnxscript")  # the dynamo exporter's; it brings onnx
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = OnnxBlock().to(device).eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            randomize_state(module)
    x = torch.randn(3, 3, 5, 5, device=device)
    with tritonbn.backend(backend):
        if dynamo:
            proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (x,), buffer, dynamo=False)
            proto = onnx.load_from_string(buffer.getvalue())
        expected = model(x)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    (y,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.cpu().numpy()})
    assert_close(torch.from_numpy(y), expected.cpu(), torch.float32, "output", reduced=64)


# ---------------------------------------------------------------------------------------------
# torch's convert_sync_batchnorm never drops a fused activation silently


@pytest.mark.parametrize(
    "make",
    [
        lambda: tritonbn.BatchNorm2d(6, activation="relu"),
        lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.Sequential(tritonbn.BatchNorm3d(6, activation="silu"))),
        lambda: nn.Sequential(tritonbn.SyncBatchNorm(6, activation="tanh")),
        lambda: tritonbn.convert(nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()), fuse_activations=True),
    ],
    ids=["bare", "nested-3d", "tritonbn-sync", "fused-by-convert"],
)
def test_torch_convert_sync_batchnorm_refuses_fused_activation(make):
    model = make()
    children = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"would drop the fused activation.*tritonbn\.convert_sync_batch"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert dict(model.named_modules()) == children
    # tritonbn's conversion keeps it.
    converted = tritonbn.convert_sync_batchnorm(model)
    activations = [m.activation for m in converted.modules() if isinstance(m, tritonbn.SyncBatchNorm)]
    assert activations and all(activation is not None for activation in activations)


def test_torch_convert_sync_batchnorm_unchanged_without_activation():
    model = nn.Sequential(tritonbn.BatchNorm2d(6), nn.Sequential(nn.BatchNorm1d(3)))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in converted.modules()][1:] == [nn.SyncBatchNorm, nn.Sequential, nn.SyncBatchNorm]
    guarded = nn.SyncBatchNorm.convert_sync_batchnorm
    assert guarded.__doc__ == guarded.__wrapped__.__doc__


# ---------------------------------------------------------------------------------------------
# torch's conv/linear-BatchNorm folding never drops a fused activation silently


def _fold_cases() -> dict[str, tuple[object, nn.Module, nn.Module]]:
    """(torch's folding function, layer, eval BatchNorm with randomized statistics) by name."""
    torch.manual_seed(0)
    cases = {
        "conv-utils": (
            lambda c, b: nn.utils.fuse_conv_bn_eval(c, b),
            nn.Conv2d(3, 6, 3),
            tritonbn.BatchNorm2d(6),
        ),
        "conv-fusion": (
            lambda c, b: nn.utils.fusion.fuse_conv_bn_eval(c, b),
            nn.Conv1d(3, 6, 3, bias=False),
            tritonbn.BatchNorm1d(6),
        ),
        "conv-transpose": (
            lambda c, b: nn.utils.fuse_conv_bn_eval(c, b, transpose=True),
            nn.ConvTranspose3d(3, 6, 2),
            tritonbn.BatchNorm3d(6),
        ),
        "linear": (lambda c, b: nn.utils.fuse_linear_bn_eval(c, b), nn.Linear(5, 6), tritonbn.BatchNorm1d(6)),
        "conv-keywords": (
            lambda c, b: nn.utils.fuse_conv_bn_eval(conv=c, bn=b, transpose=False),
            nn.Conv2d(3, 6, 3),
            tritonbn.BatchNorm2d(6),
        ),
        "linear-keywords": (
            lambda c, b: nn.utils.fusion.fuse_linear_bn_eval(linear=c, bn=b),
            nn.Linear(5, 6),
            tritonbn.BatchNorm1d(6),
        ),
        "ao-fuser": (
            lambda c, b: torch.ao.quantization.fuser_method_mappings.fuse_conv_bn(False, c, b),
            nn.Conv2d(3, 6, 1),
            tritonbn.BatchNorm2d(6),
        ),
    }
    for _, layer, bn in cases.values():
        layer.eval()
        randomize_state(bn.eval())
    return cases


INPUTS = {
    nn.Conv2d: (2, 3, 5, 5),
    nn.Conv1d: (2, 3, 7),
    nn.ConvTranspose3d: (2, 3, 2, 3, 2),
    nn.Linear: (4, 5),
}


TORCH_CLASSES = {
    tritonbn.BatchNorm1d: nn.BatchNorm1d,
    tritonbn.BatchNorm2d: nn.BatchNorm2d,
    tritonbn.BatchNorm3d: nn.BatchNorm3d,
}


@pytest.mark.parametrize("case", list(_fold_cases()))
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_torch_folding_refuses_fused_activation(case, activation):
    fold, layer, bn = _fold_cases()[case]
    bn.activation = activation
    before = snapshot(layer.weight, layer.bias, *bn.parameters(), *bn.buffers())
    with pytest.raises(ValueError, match=rf"fuses the activation '{activation}'.*bn\.activation = None"):
        fold(layer, bn)
    assert_unchanged(before, layer.weight, layer.bias, *bn.parameters(), *bn.buffers())


@pytest.mark.parametrize("case", list(_fold_cases()))
def test_torch_folding_unchanged_without_activation(case):
    # A tritonbn BatchNorm without activation folds as torch's own does: the same weights, and the
    # folded layer computes layer → BatchNorm.
    fold, layer, bn = _fold_cases()[case]
    torch_bn = TORCH_CLASSES[type(bn)](bn.num_features).eval()
    torch_bn.load_state_dict(bn.state_dict())
    folded, expected = fold(layer, bn), fold(layer, torch_bn)
    assert_unchanged(snapshot(expected.weight, expected.bias), folded.weight, folded.bias)
    x = torch.randn(INPUTS[type(layer)])
    assert_close(folded(x), bn(layer(x)), torch.float32, "output", reduced=64)
