"""tritonbn.BatchNorm1d/2d against torch.nn.BatchNorm1d/2d: every constructor option, train and
eval over several steps, forward, gradients and buffers, on each backend; and the module plumbing
(state_dict both ways, .to(), deepcopy/pickle, repr, a pruned or parametrized weight)."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize, prune

import tritonbn

from .helpers import BACKENDS, assert_close, assert_modules_match, twin_modules

# (tritonbn class, torch class, input shape): every input rank each module accepts.
KINDS = [
    (tritonbn.BatchNorm1d, nn.BatchNorm1d, (5, 3)),
    (tritonbn.BatchNorm1d, nn.BatchNorm1d, (4, 3, 6)),
    (tritonbn.BatchNorm2d, nn.BatchNorm2d, (3, 3, 4, 5)),
]
KIND_IDS = ["1d-(N,C)", "1d-(N,C,L)", "2d-(N,C,H,W)"]

# torch 2.x later than 2.4 adds a keyword-only ``bias`` (affine weight without the shift).
TORCH_HAS_BIAS_OPTION = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters

OPTIONS = [
    {},
    {"eps": 1e-3},
    {"momentum": 0.3},
    {"momentum": None},  # cumulative moving average: factor 1/num_batches_tracked
    {"affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
    *([{"bias": False}] if TORCH_HAS_BIAS_OPTION else []),
]
OPTION_IDS = [
    "default",
    "eps",
    "momentum",
    "momentum-None",
    "no-affine",
    "no-running-stats",
    "bare",
    *(["no-bias"] if TORCH_HAS_BIAS_OPTION else []),
]

# Training steps interleaved with eval steps, so that eval sees the updated running statistics.
MODES = (True, False, True, False)

# The Triton kernels take float32/16/bf16 (the module's parameters and buffers in that dtype too);
# float64 on backend "triton" falls back to torch.
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float64", "float32", "float16", "bfloat16"]


def run_steps(
    module: nn.Module,
    oracle: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    modes=MODES,
    memory_format=torch.contiguous_format,
    seed: int = 0,
) -> None:
    """Alternate train/eval steps on both modules, comparing everything after each step."""
    gen = torch.Generator().manual_seed(seed)
    for training in modes:
        module.train(training)
        oracle.train(training)
        x = 0.5 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        if len(shape) == 4:
            x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
        assert_modules_match(module, oracle, x, dy, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("options", [{}, {"momentum": None}], ids=["default", "momentum-None"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_plans_over_steps(options, channels_last):
    # 17,995 elements a channel: the split plans, whose statistics kernel counts the batch (the
    # other shapes here take fused-small's); momentum None reads that count.
    shape = (5, 3, 61, 59)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, shape[1], torch.float32, **options)
    x = torch.empty(shape).contiguous(memory_format=memory_format)
    with tritonbn.backend("triton"):
        assert tritonbn.explain(x, training=True).kernel in ("split-welford", "column-tiled")
        run_steps(module, oracle, shape, torch.float32, memory_format=memory_format)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), KINDS, ids=KIND_IDS)
def test_matches_torch_module_over_steps(backend, dtype, options, cls, torch_cls, shape):
    module, oracle = twin_modules(cls, torch_cls, shape[1], dtype, **options)
    with tritonbn.backend(backend):
        run_steps(module, oracle, shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 7),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    channels_last=st.booleans(),
)
def test_batchnorm2d_random_shapes(backend, n, c, h, w, channels_last):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, c, torch.float32)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with tritonbn.backend(backend):
        run_steps(
            module, oracle, (n, c, h, w), torch.float32, modes=(True, False), memory_format=memory_format
        )


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(2, 9), c=st.integers(1, 7), length=st.one_of(st.none(), st.integers(1, 6)))
def test_batchnorm1d_random_shapes(backend, n, c, length):
    module, oracle = twin_modules(tritonbn.BatchNorm1d, nn.BatchNorm1d, c, torch.float32)
    shape = (n, c) if length is None else (n, c, length)
    with tritonbn.backend(backend):
        run_steps(module, oracle, shape, torch.float32, modes=(True, False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_in_channels_last_out(backend, training):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 5, torch.float32)
    with tritonbn.backend(backend):
        run_steps(
            module, oracle, (3, 5, 4, 6), torch.float32, modes=(training,), memory_format=torch.channels_last
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_module(backend, dtype):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with tritonbn.backend(backend):
        y = module(x.to(dtype))
    want = oracle(x.to(dtype).double())
    assert y.dtype == dtype
    assert module.running_mean.dtype == torch.float32
    assert_close(y, want, dtype, "output")
    assert_close(module.running_mean, oracle.running_mean, torch.float32, "running_mean")
    assert_close(module.running_var, oracle.running_var, torch.float32, "running_var")


@pytest.mark.parametrize(
    ("cls", "torch_cls"), [(tritonbn.BatchNorm1d, nn.BatchNorm1d), (tritonbn.BatchNorm2d, nn.BatchNorm2d)]
)
def test_constructor_takes_every_torch_argument(cls, torch_cls):
    torch_params = inspect.signature(torch_cls.__init__).parameters
    params = inspect.signature(cls.__init__).parameters
    missing = [name for name in torch_params if name not in params]
    assert not missing, f"{cls.__name__} lacks torch's constructor arguments {missing}"
    for name, param in torch_params.items():
        assert params[name].default == param.default, name


@pytest.mark.parametrize(
    ("cls", "torch_cls"), [(tritonbn.BatchNorm1d, nn.BatchNorm1d), (tritonbn.BatchNorm2d, nn.BatchNorm2d)]
)
def test_is_a_torch_batchnorm(cls, torch_cls):
    module = cls(4)
    assert isinstance(module, torch_cls)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize(
    ("cls", "torch_cls"), [(tritonbn.BatchNorm1d, nn.BatchNorm1d), (tritonbn.BatchNorm2d, nn.BatchNorm2d)]
)
@pytest.mark.parametrize(
    "options", [{}, {"eps": 1e-3, "momentum": None}, {"affine": False}, {"track_running_stats": False}]
)
def test_defaults_and_repr_match_torch(cls, torch_cls, options):
    module, oracle = cls(4, **options), torch_cls(4, **options)
    assert repr(module) == repr(oracle)
    assert module.state_dict().keys() == oracle.state_dict().keys()
    for key, value in oracle.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
        assert module.state_dict()[key].dtype == value.dtype, key


STATE_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize(
    ("cls", "torch_cls"), [(tritonbn.BatchNorm1d, nn.BatchNorm1d), (tritonbn.BatchNorm2d, nn.BatchNorm2d)]
)
def test_state_dict_round_trips_both_ways(cls, torch_cls):
    module, oracle = twin_modules(cls, torch_cls, 4, torch.float64)
    assert set(module.state_dict()) == STATE_KEYS
    for key, value in oracle.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key

    module(
        torch.randn(3, 4, 2, dtype=torch.float64)
        if cls is tritonbn.BatchNorm1d
        else torch.randn(3, 4, 2, 2, dtype=torch.float64)
    )
    back = torch_cls(4, dtype=torch.float64)
    back.load_state_dict(module.state_dict(), strict=True)
    for key, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 4  # randomize_state set 3, one training step since


def test_to_moves_buffers_and_parameters():
    module = tritonbn.BatchNorm2d(3)
    module.to(torch.float64)
    assert module.weight.dtype == module.running_mean.dtype == module.running_var.dtype == torch.float64
    assert module.num_batches_tracked.dtype == torch.int64
    module.to("meta")
    assert all(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


def test_deepcopy_and_pickle_keep_class_and_state():
    module, _ = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32, momentum=None)
    clones = [copy.deepcopy(module), pickle.loads(pickle.dumps(module))]
    x = torch.randn(4, 3, 2, 2)
    module(x)
    for clone in clones:
        assert type(clone) is tritonbn.BatchNorm2d
        assert clone.momentum is None
        assert clone.running_mean is not module.running_mean
        assert int(clone.num_batches_tracked) == int(module.num_batches_tracked) - 1
        clone(x)
        for key, value in module.state_dict().items():
            torch.testing.assert_close(clone.state_dict()[key], value, rtol=0, atol=0, msg=key)


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def _reweight(module: nn.Module, how: str) -> nn.Parameter:
    """Make ``module.weight`` a computed attribute, as torch.nn.utils.prune and .parametrize do, or
    a plain tensor; returns the Parameter that then learns."""
    if how == "pruned":
        prune.random_unstructured(module, "weight", amount=0.5)
        return module.weight_orig
    if how == "parametrized":
        parametrize.register_parametrization(module, "weight", _Doubled())
        return module.parametrizations.weight.original
    weight = module.weight.detach().clone()
    del module.weight
    module.weight = weight
    return module.bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["pruned", "parametrized", "plain-tensor"])
def test_a_computed_weight_is_read_as_torch_reads_it(backend, how):
    dtype = torch.float32 if backend == "triton" else torch.float64
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, dtype)
    oracle.to(dtype)
    torch.manual_seed(3)
    learner = _reweight(module, how)
    torch.manual_seed(3)  # the same pruning mask
    oracle_learner = _reweight(oracle, how)
    gen = torch.Generator().manual_seed(0)
    for training in MODES:
        module.train(training)
        oracle.train(training)
        x = torch.randn(4, 3, 5, 5, generator=gen, dtype=dtype)
        with tritonbn.backend(backend):
            got = module(x)
        want = oracle(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(got.square().sum(), learner)
        (oracle_grad,) = torch.autograd.grad(want.square().sum(), oracle_learner)
        torch.testing.assert_close(grad, oracle_grad, rtol=1e-4, atol=1e-4)
        for mine, theirs in zip(module.buffers(), oracle.buffers(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("cls", "torch_cls"),
    [(tritonbn.BatchNorm2d, nn.BatchNorm2d), (tritonbn.SyncBatchNorm, nn.SyncBatchNorm)],
)
def test_a_0d_tensor_momentum_works_as_in_torch(backend, cls, torch_cls):
    # A momentum schedule may keep the factor as a 0-D tensor; torch's batch_norm takes it.
    module, oracle = cls(3), torch_cls(3)
    gen = torch.Generator().manual_seed(0)
    for momentum in (0.5, 0.25):
        module.momentum, oracle.momentum = torch.tensor(momentum), torch.tensor(momentum)
        x = torch.randn(4, 3, 2, 2, generator=gen)
        with tritonbn.backend(backend):
            got = module(x)
        torch.testing.assert_close(got, oracle(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.running_mean, oracle.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(module.running_var, oracle.running_var, rtol=1e-6, atol=1e-6)
