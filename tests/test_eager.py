"""The modules' eager fast path (``tritonbn.eager``): a call whose signature the module has run
skips the checks and the dispatcher. Every test runs the Triton kernels (the interpreter here)
and proves two things: the remembered path gives torch's results, and anything that could change
the outcome of the skipped work sends the call back through the checks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import eager, modules, tuning

from .helpers import (
    assert_module_unchanged,
    assert_modules_match,
    module_state,
    randomize_state,
    twin_modules,
)

# CPU tensors on the Triton backend: the interpreter's Python fast path. On a GPU the C++ glue
# takes remembered calls over (tests/test_glue.py checks its launches under the stand-in driver).
pytestmark = pytest.mark.interpreter

SHAPES = {
    "fused-small": (6, 3, 5, 7),
    "split": (40, 3, 17, 19),  # more elements a channel than one program holds
}


@pytest.fixture(autouse=True)
def _triton():
    with tritonbn.backend("triton"):
        yield


class Spy:
    """Counts the calls of ``owner.name`` (still calling it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls = 0
        real = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def checks(monkeypatch):
    """The checked path's argument checks, counted."""
    return Spy(monkeypatch, modules, "check_batch_norm_args")


@pytest.fixture
def remembered(monkeypatch):
    """The fast path's autograd Function, counted."""
    return Spy(monkeypatch, eager.EagerBatchNorm, "apply")


def _data(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("plan", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remembered_calls_match_torch_step_after_step(plan, dtype, checks, remembered):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, dtype)
    for step in range(3):
        x, dy = _data(SHAPES[plan], step)
        assert_modules_match(module, oracle, x, dy, dtype)
    assert checks.calls == 1, "only the first call is checked"
    assert remembered.calls == 2


@pytest.mark.parametrize("plan", SHAPES)
def test_remembered_calls_with_an_activation_match_torch(plan, remembered):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    module.activation = "silu"
    for step in range(3):
        x, dy = _data(SHAPES[plan], step)
        x64 = x.double().requires_grad_()
        want = torch.nn.functional.silu(oracle(x64))
        want_dx, want_dw = torch.autograd.grad(want, (x64, oracle.weight), dy.double())
        x32 = x.requires_grad_()
        got = module(x32)
        got_dx, got_dw = torch.autograd.grad(got, (x32, module.weight), dy)
        for name, actual, expected in (("y", got, want), ("dx", got_dx, want_dx), ("dw", got_dw, want_dw)):
            torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(module.running_var.double(), oracle.running_var, rtol=1e-5, atol=1e-6)
    assert remembered.calls == 2


@pytest.mark.parametrize("plan", SHAPES)
def test_eval_and_cumulative_momentum_and_untracked_statistics(plan, remembered):
    shape = SHAPES[plan]
    for options in ({"momentum": None}, {"track_running_stats": False}, {}):
        module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32, **options)
        for step in range(3):
            x, dy = _data(shape, step)
            assert_modules_match(module, oracle, x, dy, torch.float32)
        module.eval(), oracle.eval()
        for step in range(2):
            x, dy = _data(shape, 10 + step)
            assert_modules_match(module, oracle, x, dy, torch.float32)
    assert remembered.calls > 0


def test_what_the_signature_holds_sends_the_call_back_through_the_checks(checks, remembered):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    shape = SHAPES["fused-small"]

    def step(seed):
        x, dy = _data(shape, seed)
        assert_modules_match(module, oracle, x, dy, torch.float32)

    step(0)
    step(1)
    assert (checks.calls, remembered.calls) == (1, 1)
    # (change, checked calls after it): each new signature is checked once, then remembered;
    # back in training mode the signature is one the module has run.
    changes = [
        (lambda m: setattr(m, "momentum", 0.25), 2),
        (lambda m: setattr(m, "eps", 1e-3), 3),
        (lambda m: m.eval(), 4),
        (lambda m: m.train(), 4),
    ]
    for number, (change, checked) in enumerate(changes):
        change(module), change(oracle)
        step(2 + number)
        step(20 + number)
        assert checks.calls == checked
    # A reassigned parameter: another tensor, another address.
    with torch.no_grad():
        weight = torch.randn(3)
    module.weight = nn.Parameter(weight.clone())
    oracle.weight = nn.Parameter(weight.double())
    step(30)
    assert checks.calls == 5


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_running_statistics_given_after_remembered_calls_are_used(mode, checks):
    # Without tracked statistics the buffers are None: the remembered calls normalize with the
    # batch's. Buffers registered later are used as torch uses them (in eval; a tracking module
    # in training updates them), and taken away again, they are no longer.
    module, oracle = twin_modules(
        tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32, track_running_stats=False
    )
    module.train(mode == "train"), oracle.train(mode == "train")
    shape = SHAPES["fused-small"]
    seeds = iter(range(100))

    def steps():
        for _ in range(2):
            x, dy = _data(shape, next(seeds))
            assert_modules_match(module, oracle, x, dy, torch.float32)

    steps()
    mean, var = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    for m, dtype in ((module, torch.float32), (oracle, torch.float64)):
        m.running_mean, m.running_var = mean.to(dtype), var.to(dtype)
        m.num_batches_tracked = torch.tensor(0)
        m.track_running_stats = True
    steps()
    for m in (module, oracle):
        m.running_mean = m.running_var = m.num_batches_tracked = None
    steps()
    assert checks.calls == 3


def test_a_cast_or_replaced_buffer_is_checked_again_and_refused_unchanged():
    module = tritonbn.BatchNorm2d(3)
    x, _ = _data(SHAPES["fused-small"])
    module(x), module(x)
    module.running_mean = torch.zeros(4)  # the wrong size: the checks must see it
    before = module_state(module)
    with pytest.raises(RuntimeError, match="'running_mean' must have 3 elements"):
        module(x)
    assert_module_unchanged(before, module)
    module.running_mean = torch.zeros(3)
    module.half()  # parameters and buffers cast: float32 input, float16 parameters
    before = module_state(module)
    try:
        y = module(x)
    except (RuntimeError, TypeError, ValueError):
        assert_module_unchanged(before, module)
    else:
        assert y.dtype == x.dtype


def test_another_backend_or_a_reloaded_tuning_table_is_not_skipped(monkeypatch, remembered):
    module = tritonbn.BatchNorm2d(3)
    x, _ = _data(SHAPES["fused-small"])
    module(x), module(x)
    assert remembered.calls == 1
    with tritonbn.backend("reference"):
        y = module(x)
    assert remembered.calls == 1
    reference = tritonbn.reference.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    decide = Spy(monkeypatch, tritonbn.dispatch, "select_plan")
    monkeypatch.setattr(modules, "select_plan", tritonbn.dispatch.select_plan)
    module(x)
    assert decide.calls == 0
    tuning.reload()
    module(x)
    assert decide.calls == 1, "dropped decisions are made again"


def test_unaligned_input_gets_its_own_launch_site():
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    shape = SHAPES["fused-small"]
    count = torch.Size(shape).numel()
    for step, offset in enumerate((0, 1, 1, 0)):  # 4 bytes in: not 16-byte aligned
        x, dy = _data(shape, step)
        unaligned = torch.empty(count + 1)[offset : offset + count].view(shape).copy_(x)
        assert (unaligned.data_ptr() % 16 == 0) == (offset == 0)
        got = module(unaligned.requires_grad_())
        (got_dx,) = torch.autograd.grad(got, unaligned, dy)
        x64 = x.double().requires_grad_()
        want = oracle(x64)
        (want_dx,) = torch.autograd.grad(want, x64, dy.double())
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_dx.double(), want_dx, rtol=1e-4, atol=1e-4)
    assert len(module._eager_calls) == 2


@pytest.mark.parametrize("plan", SHAPES)
def test_a_saved_input_given_back_in_another_layout_is_read_as_the_forward_laid_it_out(plan, remembered):
    # save_on_cpu(pin_memory=True) and other offloading hooks hand the saved input back contiguous:
    # the remembered backward's launches take the forward's (channels_last) strides.
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
        for step in range(3):
            x, dy = _data(SHAPES[plan], step)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            (got_dx, got_dw) = torch.autograd.grad(module(x), (x, module.weight), dy)
            x64 = x.detach().double().requires_grad_()
            (want_dx, want_dw) = torch.autograd.grad(oracle(x64), (x64, oracle.weight), dy.double())
            torch.testing.assert_close(got_dx.double(), want_dx, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_dw.double(), want_dw, rtol=1e-4, atol=1e-4)
    assert remembered.calls == 2


def test_calls_that_are_never_remembered(remembered):
    module = tritonbn.BatchNorm2d(3, activation="leaky_relu", memory_efficient=True)
    x, _ = _data(SHAPES["fused-small"])
    module(x), module(x)
    residual = tritonbn.BatchNorm2d(3, activation="relu")
    residual(x, residual=x), residual(x, residual=x)
    assert remembered.calls == 0
    assert module._eager_calls is None and residual._eager_calls is None


def test_double_backward_through_a_remembered_call(remembered):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    x, _ = _data(SHAPES["fused-small"])
    module(x)  # remembered from here on; the oracle takes the same step
    oracle(x.double())
    penalties = []
    for m, dtype in ((module, torch.float32), (oracle, torch.float64)):
        xi = x.to(dtype).requires_grad_()
        (dx,) = torch.autograd.grad(m(xi).square().sum(), xi, create_graph=True)
        (dw,) = torch.autograd.grad(dx.square().sum(), m.weight)
        penalties.append(dw)
    assert remembered.calls == 1
    torch.testing.assert_close(penalties[0].double(), penalties[1], rtol=1e-3, atol=1e-3)


def test_copies_and_pickles_start_with_nothing_remembered():
    module = tritonbn.BatchNorm2d(3)
    x, _ = _data(SHAPES["fused-small"])
    module(x), module(x)
    assert len(module._eager_calls) == 1
    assert len(copy.deepcopy(module)._eager_calls) == 0
    restored = pickle.loads(pickle.dumps(module))
    assert len(restored._eager_calls) == 0
    assert "_eager_calls" not in module.state_dict()
    torch.testing.assert_close(restored(x), module(x))


def test_frozen_parameters_and_a_loaded_state_after_remembered_calls(remembered):
    module, oracle = twin_modules(tritonbn.BatchNorm2d, nn.BatchNorm2d, 3, torch.float32)
    shape = SHAPES["split"]
    for step in range(2):
        x, dy = _data(shape, step)
        assert_modules_match(module, oracle, x, dy, torch.float32)
    for m in (module, oracle):  # fine-tuning with frozen parameters: only dx is asked for
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    x, dy = _data(shape, 5)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    (got,) = torch.autograd.grad(module(x32), x32, dy)
    (want,) = torch.autograd.grad(oracle(x64), x64, dy.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # load_state_dict copies into the same tensors: the remembered call stays, with the new values.
    source = nn.BatchNorm2d(3, dtype=torch.float64)
    randomize_state(source, seed=7)
    module.load_state_dict(source.state_dict())
    oracle.load_state_dict(source.state_dict())
    before = remembered.calls
    module.eval(), oracle.eval()
    module(x), module(x)
    torch.testing.assert_close(module(x).double(), oracle(x.double()), rtol=1e-4, atol=1e-4)
    assert remembered.calls > before
