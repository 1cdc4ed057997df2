"""Every error path of the functional and the modules: the exception type torch uses, a message
naming the argument, what was expected and what came, and nothing mutated by a call that raised.
Also the calls that are not errors at the edges: empty batches, NaN and Inf behave as torch's."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
import tritonbn.dispatch

from .helpers import (
    BACKENDS,
    assert_module_unchanged,
    assert_unchanged,
    module_state,
    randomize_state,
    snapshot,
)

C = 3


def base_args() -> dict[str, object]:
    """A valid training call on (4, C, 5) float32 input with every optional tensor present."""
    return {
        "input": torch.randn(4, C, 5),
        "running_mean": torch.randn(C),
        "running_var": torch.rand(C) + 0.5,
        "weight": torch.randn(C),
        "bias": torch.randn(C),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
    }


@dataclass
class Case:
    """A malformed call: ``change`` edits ``base_args()``; ``torch_agrees`` says whether
    torch.nn.functional.batch_norm rejects it with the same exception type."""

    id: str
    change: Callable[[dict[str, object]], None]
    error: type[Exception]
    match: str
    torch_agrees: bool = True


def put(**values: object) -> Callable[[dict[str, object]], None]:
    return lambda args: args.update(values)


def put_lazy(**makers: Callable[[], object]) -> Callable[[dict[str, object]], None]:
    return lambda args: args.update({key: make() for key, make in makers.items()})


FUNCTIONAL_CASES = [
    Case(
        "input-not-a-tensor",
        put(input=[[1.0, 2.0]]),
        TypeError,
        r"'input' must be a torch\.Tensor, got list",
        torch_agrees=False,
    ),
    # torch raises RuntimeError or IndexError here, depending on the other arguments; tritonbn says
    # ValueError, like torch's modules do for a wrong number of dimensions.
    Case(
        "input-1d",
        put_lazy(input=lambda: torch.randn(C)),
        ValueError,
        r"'input' must have at least 2 dimensions.*got a 1D tensor of shape \(3,\)",
        torch_agrees=False,
    ),
    Case(
        "input-int64",
        put_lazy(input=lambda: torch.ones(4, C, 5, dtype=torch.int64)),
        NotImplementedError,
        r"'input' must be float16, bfloat16, float32 or float64, got int64",
    ),
    Case(
        "input-bool",
        put_lazy(input=lambda: torch.ones(4, C, 5, dtype=torch.bool)),
        NotImplementedError,
        r"'input' must be .*float64, got bool",
    ),
    Case(
        "input-complex",
        put_lazy(input=lambda: torch.ones(4, C, 5, dtype=torch.complex64)),
        NotImplementedError,
        r"'input' must be .*float64, got complex64",
    ),
    *[
        Case(
            f"{name}-channels",
            put_lazy(**{name: lambda: torch.ones(C + 1)}),
            RuntimeError,
            rf"'{name}' must have 3 elements .*got 4",
        )
        for name in ("running_mean", "running_var", "weight", "bias")
    ],
    *[
        Case(
            f"{name}-2d",
            put_lazy(**{name: lambda: torch.ones(C, 1)}),
            RuntimeError,
            rf"'{name}' must be a 1-D tensor, got shape \(3, 1\)",
        )
        for name in ("running_mean", "running_var")
    ],
    *[
        Case(
            f"{name}-on-meta",
            put_lazy(**{name: lambda: torch.ones(C, device="meta")}),
            RuntimeError,
            rf"'{name}' must be on the same device as 'input' \(cpu\), got meta",
        )
        for name in ("running_mean", "running_var", "weight", "bias")
    ],
    Case(
        "input-on-meta",
        put_lazy(input=lambda: torch.ones(4, C, 5, device="meta")),
        RuntimeError,
        r"'running_mean' must be on the same device as 'input' \(meta\), got cpu",
    ),
    Case(
        "running_mean-float64",
        put_lazy(running_mean=lambda: torch.zeros(C, dtype=torch.float64)),
        RuntimeError,
        r"'running_mean' must have dtype float32 for a float32 'input', got float64",
    ),
    Case(
        "weight-int64",
        put_lazy(weight=lambda: torch.ones(C, dtype=torch.int64)),
        RuntimeError,
        r"'weight' must have dtype float32 .*got int64",
    ),
    Case(
        "weight-not-a-tensor",
        put(weight=[1.0, 1.0, 1.0]),
        TypeError,
        r"'weight' must be a torch\.Tensor or None, got list",
    ),
    Case(
        "eval-running_mean-None",
        put(training=False, running_mean=None),
        RuntimeError,
        r"'running_mean' must be a tensor in evaluation mode \(training=False\), got None",
    ),
    Case(
        "eval-running_var-None",
        put(training=False, running_var=None),
        RuntimeError,
        r"'running_var' must be a tensor in evaluation mode \(training=False\), got None",
    ),
    *[
        Case(
            f"{name}-requires-grad",
            put_lazy(**{name: lambda: torch.ones(C, requires_grad=True)}),
            RuntimeError,
            rf"'{name}' must not require grad",
        )
        for name in ("running_mean", "running_var")
    ],
    Case(
        "train-running_var-None-only",
        put(running_var=None),
        ValueError,
        r"'running_mean' and 'running_var' must both be tensors or both be None",
    ),
    Case(
        "one-value-per-channel-2d",
        put_lazy(input=lambda: torch.randn(1, C)),
        ValueError,
        r"more than 1 value per channel when training, got input size \(1, 3\)",
    ),
    Case(
        "one-value-per-channel-4d",
        put_lazy(input=lambda: torch.randn(1, C, 1, 1)),
        ValueError,
        r"more than 1 value per channel when training, got input size \(1, 3, 1, 1\)",
    ),
    Case("momentum-str", put(momentum="0.1"), TypeError, r"'momentum' must be a float, got str"),
    Case("momentum-None", put(momentum=None), TypeError, r"'momentum' must be a float, got NoneType"),
    Case(
        "momentum-bool",
        put(momentum=True),
        TypeError,
        r"'momentum' must be a float, got bool",
        torch_agrees=False,
    ),
    *[
        Case(
            f"momentum-{value}",
            put(momentum=value),
            ValueError,
            r"'momentum' must be in \[0, 1\], got",
            torch_agrees=False,
        )
        for value in (-0.1, 1.5, float("nan"))
    ],
    Case("eps-str", put(eps="1e-5"), TypeError, r"'eps' must be a float, got str"),
    Case("eps-zero-in-training", put(eps=0.0), ValueError, r"'eps' must be a finite number > 0, got 0\.0"),
    Case("eps-negative", put(eps=-1e-5), ValueError, r"'eps' must be a finite number > 0, got -1e-05"),
    Case(
        "eps-negative-in-eval",
        put(eps=-1e-5, training=False),
        ValueError,
        r"'eps' must be a finite number >=? 0, got -1e-05",
        torch_agrees=False,
    ),
    *[
        Case(
            f"eps-{value}",
            put(eps=value),
            ValueError,
            r"'eps' must be a finite number > 0, got",
            torch_agrees=False,
        )
        for value in (float("inf"), float("nan"))
    ],
]

FUNCTIONS = {
    "batch_norm": tritonbn.batch_norm,
    "batch_norm-triton": tritonbn.batch_norm,
    "reference": tritonbn.reference.batch_norm,
}


def cpu_tensors(args: dict[str, object]) -> list[torch.Tensor | None]:
    """The running statistics and parameters of a call, those on the CPU (meta ones hold no values)."""
    names = ("running_mean", "running_var", "weight", "bias", "input")
    tensors = [args.get(name) for name in names]
    return [t if isinstance(t, torch.Tensor) and t.device.type == "cpu" else None for t in tensors]


@pytest.mark.parametrize(
    "function",
    [
        pytest.param(name, marks=pytest.mark.interpreter) if name.endswith("triton") else name
        for name in FUNCTIONS
    ],
)
@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=[case.id for case in FUNCTIONAL_CASES])
def test_functional_rejects_and_mutates_nothing(function, case):
    args = base_args()
    case.change(args)
    tensors = cpu_tensors(args)
    before = snapshot(*tensors)
    with (
        tritonbn.backend("triton" if function.endswith("triton") else "auto"),
        pytest.raises(case.error, match=case.match),
    ):
        FUNCTIONS[function](**args)
    assert_unchanged(before, *tensors)


@pytest.mark.parametrize(
    "case",
    [c for c in FUNCTIONAL_CASES if c.torch_agrees],
    ids=[c.id for c in FUNCTIONAL_CASES if c.torch_agrees],
)
def test_torch_raises_the_same_exception_type(case):
    args = base_args()
    case.change(args)
    with pytest.raises(case.error):
        F.batch_norm(**args)


def test_eval_eps_zero_is_accepted_where_torch_accepts_it():
    # torch 2.14 accepts eps=0 in evaluation mode; older releases refuse eps <= 0 everywhere.
    args = base_args()
    args.update(training=False, eps=0.0)
    try:
        expected = F.batch_norm(**args)
    except ValueError:
        with pytest.raises(ValueError, match=r"'eps' must be a finite number > 0, got 0\.0"):
            tritonbn.batch_norm(**args)
    else:
        torch.testing.assert_close(tritonbn.batch_norm(**args), expected)


# ---------------------------------------------------------------------------------------------
# Modules


def make_module(kind: str) -> nn.Module:
    """A tritonbn module of ``kind`` with C channels and non-default state, in training mode."""
    module = {"1d": tritonbn.BatchNorm1d, "2d": tritonbn.BatchNorm2d}[kind](C)
    randomize_state(module)
    return module


VALID_SHAPES = {"1d": (4, C), "2d": (4, C, 2, 2)}


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        ("1d", (C,), r"2D \(N, C\) or 3D \(N, C, L\), got a 1D tensor of shape \(3,\)"),
        ("1d", (2, C, 2, 2), r"2D \(N, C\) or 3D \(N, C, L\), got a 4D tensor"),
        ("2d", (2, C, 4), r"4D \(N, C, H, W\), got a 3D tensor of shape \(2, 3, 4\)"),
        ("2d", (2, C, 2, 2, 2), r"4D \(N, C, H, W\), got a 5D tensor"),
    ],
)
def test_module_rejects_wrong_number_of_dims(kind, shape, expected):
    module = make_module(kind)
    before = module_state(module)
    with pytest.raises(ValueError, match=rf"BatchNorm{kind}: 'input' must be {expected}"):
        module(torch.randn(shape))
    assert_module_unchanged(before, module)
    torch_module = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind](C)
    with pytest.raises(ValueError):
        torch_module(torch.randn(shape))


def wrong_size(module: nn.Module, name: str) -> None:
    """Replace the parameter or buffer ``name`` with one of C + 1 elements."""
    if name in ("weight", "bias"):
        setattr(module, name, nn.Parameter(torch.ones(C + 1)))
    else:
        setattr(module, name, torch.ones(C + 1))


@dataclass
class ModuleCase:
    """A module call that must raise: ``prepare`` edits the module and returns the input."""

    id: str
    prepare: Callable[[nn.Module, tuple[int, ...]], torch.Tensor]
    error: type[Exception]
    match: str


def channels_plus_one(module, shape):
    return torch.randn(shape[0], C + 1, *shape[2:])


def one_value_per_channel(module, shape):
    return torch.randn(1, C, *([1] * (len(shape) - 2)))


def with_wrong(name: str):
    def prepare(module, shape):
        wrong_size(module, name)
        return torch.randn(shape)

    return prepare


def of_dtype(dtype: torch.dtype):
    return lambda module, shape: torch.ones(shape, dtype=dtype)


def on_meta(module, shape):
    return torch.randn(shape, device="meta")


def without_running_var(training: bool):
    def prepare(module, shape):
        module.running_var = None
        module.train(training)
        return torch.randn(shape)

    return prepare


MODULE_CASES = [
    ModuleCase(
        "channels",
        channels_plus_one,
        RuntimeError,
        r"'input' must have num_features=3 channels in dim 1, got 4",
    ),
    *[
        ModuleCase(f"{name}-size", with_wrong(name), RuntimeError, rf"'{name}' must have 3 elements.*got 4")
        for name in ("weight", "bias", "running_mean", "running_var")
    ],
    ModuleCase(
        "one-value-per-channel",
        one_value_per_channel,
        ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    ModuleCase(
        "input-on-meta",
        on_meta,
        RuntimeError,
        r"'running_mean' must be on the same device as 'input' \(meta\), got cpu",
    ),
    *[
        ModuleCase(f"input-{name}", of_dtype(dtype), NotImplementedError, rf"'input' must be .*, got {name}")
        for name, dtype in (("int64", torch.int64), ("bool", torch.bool), ("complex64", torch.complex64))
    ],
    ModuleCase(
        "eval-running_var-None",
        without_running_var(False),
        RuntimeError,
        r"'running_var' must be a tensor in evaluation mode",
    ),
    ModuleCase(
        "train-running_var-None",
        without_running_var(True),
        ValueError,
        r"'running_mean' and 'running_var' must both be tensors or both be None",
    ),
]


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=[case.id for case in MODULE_CASES])
def test_module_rejects_and_mutates_nothing(kind, case):
    module = make_module(kind)
    x = case.prepare(module, VALID_SHAPES[kind])
    before = module_state(module)
    with pytest.raises(case.error, match=case.match):
        module(x)
    assert_module_unchanged(before, module)
    torch_module = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind](C)
    with pytest.raises(case.error):
        torch_module(case.prepare(torch_module, VALID_SHAPES[kind]))


def test_module_eval_accepts_one_value_per_channel():
    module = make_module("2d").eval()
    torch_module = nn.BatchNorm2d(C).eval()
    torch_module.load_state_dict(module.state_dict())
    x = torch.randn(1, C, 1, 1)
    torch.testing.assert_close(module(x), torch_module(x))


CONSTRUCTORS = {
    "BatchNorm1d": tritonbn.BatchNorm1d,
    "BatchNorm2d": tritonbn.BatchNorm2d,
    "BatchNorm3d": tritonbn.BatchNorm3d,
    "SyncBatchNorm": tritonbn.SyncBatchNorm,
    "BatchNorm-2": lambda c, **kw: tritonbn.BatchNorm(c, 2, **kw),
    "BatchNorm-4": lambda c, **kw: tritonbn.BatchNorm(c, 4, **kw),
}


@pytest.mark.parametrize("constructor", list(CONSTRUCTORS))
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"momentum": "0.1"}, TypeError, r"'momentum' must be a float or None, got str"),
        ({"momentum": True}, TypeError, r"'momentum' must be a float or None, got bool"),
        ({"momentum": -0.1}, ValueError, r"'momentum' must be in \[0, 1\] or None, got -0\.1"),
        ({"momentum": 1.5}, ValueError, r"'momentum' must be in \[0, 1\] or None, got 1\.5"),
        ({"momentum": float("nan")}, ValueError, r"'momentum' must be in \[0, 1\] or None, got nan"),
        ({"eps": "1e-5"}, TypeError, r"'eps' must be a float, got str"),
        ({"eps": None}, TypeError, r"'eps' must be a float, got NoneType"),
        ({"eps": -1e-5}, ValueError, r"'eps' must be a finite number >= 0, got -1e-05"),
        ({"eps": float("inf")}, ValueError, r"'eps' must be a finite number >= 0, got inf"),
        ({"eps": float("nan")}, ValueError, r"'eps' must be a finite number >= 0, got nan"),
    ],
    ids=[
        "momentum-str",
        "momentum-bool",
        "momentum-negative",
        "momentum-above-1",
        "momentum-nan",
        "eps-str",
        "eps-None",
        "eps-negative",
        "eps-inf",
        "eps-nan",
    ],
)
def test_constructor_rejects_bad_options(constructor, options, error, match):
    with pytest.raises(error, match=match):
        CONSTRUCTORS[constructor](C, **options)


@pytest.mark.parametrize("constructor", list(CONSTRUCTORS))
@pytest.mark.parametrize("num_features", [0, -1, 2.5, True, "3", None, torch.tensor(2.0)])
def test_constructor_rejects_bad_num_features(constructor, num_features):
    expected = rf"'num_features' must be a positive int, got {re.escape(repr(num_features))}"
    with pytest.raises(ValueError, match=expected):
        CONSTRUCTORS[constructor](num_features)


# ---------------------------------------------------------------------------------------------
# Backend selection errors


@pytest.mark.parametrize(
    ("variable", "value", "other"),
    [
        ("TRITONBN_BACKEND", "cuda", None),
        ("TRITONBN_PLAN", "fastest", ("TRITONBN_BACKEND", "triton")),
    ],
)
def test_bad_environment_variable_raises_naming_it(monkeypatch, variable, value, other):
    monkeypatch.setenv(variable, value)
    if other is not None:
        monkeypatch.setenv(*other)
    args = base_args()
    before = snapshot(args["running_mean"], args["running_var"])
    with pytest.raises(ValueError, match=rf"{variable} must be one of .*, got '{value}'"):
        tritonbn.batch_norm(**args)
    assert_unchanged(before, args["running_mean"], args["running_var"])
    module = make_module("2d")
    state = module_state(module)
    with pytest.raises(ValueError, match=variable):
        module(torch.randn(VALID_SHAPES["2d"]))
    assert_module_unchanged(state, module)


@pytest.mark.interpreter
def test_forced_plan_that_does_not_fit_mutates_nothing():
    module = make_module("2d")
    state = module_state(module)
    with (
        tritonbn.backend("triton", plan="column-tiled"),
        pytest.raises(ValueError, match=r"plan 'column-tiled' needs .*got layout 'nchw'"),
    ):
        module(torch.randn(VALID_SHAPES["2d"]))
    assert_module_unchanged(state, module)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(tritonbn.dispatch, "launches_cpu_tensors", lambda: False)
    args = base_args()
    before = snapshot(args["running_mean"], args["running_var"])
    with (
        tritonbn.backend("triton"),
        pytest.raises(
            RuntimeError,
            match=r"backend 'triton' got a cpu tensor.*"
            r"TRITON_INTERPRET=1",
        ),
    ):
        tritonbn.batch_norm(**args)
    assert_unchanged(before, args["running_mean"], args["running_var"])
    module = make_module("2d")
    state = module_state(module)
    monkeypatch.setenv("TRITONBN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        module(torch.randn(VALID_SHAPES["2d"]))
    assert_module_unchanged(state, module)


# ---------------------------------------------------------------------------------------------
# Not errors: empty batches, NaN and Inf follow torch

BACKEND_PLANS = [(name, None) for name in BACKENDS] + [("triton", "split-welford")]
BACKEND_PLAN_IDS = [*BACKENDS, "triton-split-welford"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "shape"), [("1d", (0, C)), ("2d", (0, C, 4, 4))])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_like_torch(backend, kind, shape, training):
    module = make_module(kind).train(training)
    torch_module = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind](C).train(training)
    torch_module.load_state_dict(module.state_dict())
    x = torch.randn(shape, requires_grad=True)
    with tritonbn.backend(backend):
        y = module(x)
        y.sum().backward()
    want = torch_module(x)
    want.sum().backward()
    assert y.shape == want.shape
    torch.testing.assert_close(module.weight.grad, torch_module.weight.grad, equal_nan=True)
    for key, value in torch_module.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, equal_nan=True, msg=key)


def poisoned_input(shape: tuple[int, ...]) -> torch.Tensor:
    """Random input whose channel 0 holds a NaN, channel 1 a +Inf and channel 2 a -Inf; channel 3 is
    finite and must stay unaffected."""
    x = torch.randn(shape)
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    x[0, 2] = -float("inf")
    return x


# The interpreter runs the kernels in numpy, which warns about the NaN that Inf - Inf makes.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(("backend", "plan"), BACKEND_PLANS, ids=BACKEND_PLAN_IDS)
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_behave_like_torch(backend, plan, shape, training):
    x = poisoned_input(shape)
    args = {"weight": torch.rand(4) + 0.5, "bias": torch.randn(4), "training": training}
    stats = [torch.randn(4), torch.rand(4) + 0.5]
    torch_stats = snapshot(*stats)
    with tritonbn.backend(backend, plan=plan if training else None):
        y = tritonbn.batch_norm(x, *stats, **args)
    want = F.batch_norm(x, *torch_stats, **args)
    torch.testing.assert_close(y, want, equal_nan=True)
    assert torch.isfinite(y[:, 3]).all()
    torch.testing.assert_close(stats[0], torch_stats[0], equal_nan=True)
    torch.testing.assert_close(stats[1], torch_stats[1], equal_nan=True)
