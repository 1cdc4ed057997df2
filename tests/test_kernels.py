"""The Triton kernels against the float64 reference: every plan, ragged shapes, every dtype,
train and eval, forward, backward and running statistics. On CPU they run through Triton's
interpreter (tests/conftest.py); with a GPU, compiled on CUDA."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tritonbn
import tritonbn.kernels as kernels_package
from tritonbn.kernels import describe

from .conftest import DEVICE
from .kernel_cases import Step, assert_step_close, make_inputs, reference_step, run_step

# (shape, channels_last, plan): ragged N, C = 1, 3 and primes, spatial 1, 9, 49, 2-D and 3-D,
# and slabs larger than one tile (split plans) or exactly one (fused-small).
PLAN_CASES = [
    ((7, 3, 3, 3), False, "split-welford"),
    ((5, 1, 7, 7), False, "split-welford"),
    ((3, 5, 41, 43), False, "split-welford"),  # 5,289 elements a channel: several tiles and splits
    ((13, 7), False, "split-welford"),
    ((6, 5, 13), False, "split-welford"),
    ((4, 3, 1, 1), False, "split-welford"),
    ((7, 3, 3, 3), False, "fused-small"),
    ((9, 11, 7, 7), False, "fused-small"),
    ((37, 13), False, "fused-small"),
    ((5, 2, 9), False, "fused-small"),
    ((3, 7, 3, 3), True, "fused-small"),
    ((7, 3, 3, 3), True, "column-tiled"),
    ((3, 13, 7, 7), True, "column-tiled"),
    ((2, 67, 7, 9), True, "column-tiled"),  # C = 67: two channel blocks, the second ragged
    ((37, 13), False, "column-tiled"),
    ((1031, 5), False, "column-tiled"),  # rows > one tile
    ((6, 5, 1), False, "column-tiled"),
    ((3, 5, 2, 2), True, "split-welford"),  # channel-major tiling of a channels_last tensor
    ((2, 3, 2, 3, 5), False, "split-welford"),  # 5-D
    ((2, 3, 2, 3, 5), True, "column-tiled"),  # channels_last_3d
]


def _reduced(shape):
    return math.prod(shape) // shape[1]


@pytest.mark.parametrize("shape, channels_last, plan", PLAN_CASES)
def test_plan_matches_reference_fp32(shape, channels_last, plan, device):
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last)
    got = run_step(inputs, backend="triton", plan=plan)
    want = reference_step(inputs)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))
    if channels_last:
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert got.y.is_contiguous(memory_format=memory_format)
        assert got.dx.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize(
    "shape, channels_last, plan",
    [
        ((6, 3, 7, 7), False, "split-welford"),
        ((6, 3, 7, 7), False, "fused-small"),
        ((5, 3, 5, 5), True, "column-tiled"),
        ((33, 6), False, "column-tiled"),
    ],
)
def test_half_inputs(shape, channels_last, plan, dtype, param_dtype, device):
    inputs = make_inputs(shape, dtype, device, channels_last=channels_last)
    pdtype = torch.float32 if param_dtype == "float32" else dtype
    got = run_step(inputs, backend="triton", plan=plan, param_dtype=pdtype)
    assert got.y.dtype == dtype and got.dx.dtype == dtype and got.dw.dtype == pdtype
    want = reference_step(inputs)
    assert_step_close(got, want, dtype, reduced=_reduced(shape), param_dtype=pdtype)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((7, 3, 3, 3), False), ((3, 5, 41, 43), False), ((5, 3, 3, 3), True), ((37, 13), False)],
)
def test_eval_forward_and_backward(shape, channels_last, device):
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last)
    got = run_step(inputs, backend="triton", training=False)
    want = reference_step(inputs, training=False)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


@pytest.mark.parametrize("plan", ["split-welford", "fused-small", "column-tiled", "eval"])
def test_large_mean_offset_fp32(plan, device):
    # 1e4 + randn: E[x²] − E[x]² would lose every digit of the variance in fp32.
    shape = (9, 4, 13, 13)
    training = plan != "eval"
    inputs = make_inputs(shape, torch.float32, device, offset=1e4, channels_last=plan == "column-tiled")
    inputs["running_mean"] = inputs["running_mean"] + 1e4
    got = run_step(inputs, backend="triton", plan=plan, training=training)
    want = reference_step(inputs, training=training)
    assert torch.all(got.running_var > 0)
    # x − mean carries the rounding of a 1e4-sized mean: ~1e-3 absolute in fp32.
    torch.testing.assert_close(got.y.double().cpu(), want.y.cpu(), rtol=0, atol=5e-3)
    torch.testing.assert_close(got.running_var.double().cpu(), want.running_var.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.dx.double().cpu(), want.dx.cpu(), rtol=0, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("plan", ["split-welford", "fused-small"])
def test_large_mean_offset_half(plan, dtype, device):
    shape = (8, 3, 9, 9)
    inputs = make_inputs(shape, dtype, device, offset=50.0, scale=0.1)
    got = run_step(inputs, backend="triton", plan=plan)
    want = reference_step(inputs)
    assert torch.all(got.running_var > 0)
    # The half input itself is quantized to ~0.03 at 50: compare on that (rounded) input, with the
    # output's own half precision.
    rtol, atol = (2e-3, 2e-2) if dtype == torch.float16 else (1.6e-2, 6e-2)
    torch.testing.assert_close(got.y.double().cpu(), want.y.cpu(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got.running_var.double().cpu(), want.running_var.cpu(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "plan, channels_last",
    [
        ("split-welford", False),
        ("split-welford", True),
        ("fused-small", False),
        ("fused-small", True),
        ("column-tiled", True),
    ],
)
def test_constant_channel_has_zero_variance(plan, channels_last, device):
    # A channel holding one value has mean exactly that value and variance exactly 0. With eps =
    # 1e-12, a mean one ulp off (2.4e-7 at 3.7) would move y by 2.4e-7/1e-6 ≈ 0.24.
    shape = (9, 3, 7, 5)
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last)
    inputs["x"][:, 1] = 3.7
    got = run_step(inputs, backend="triton", plan=plan, eps=1e-12)
    want = reference_step(inputs, eps=1e-12)
    torch.testing.assert_close(got.y[:, 1].cpu(), want.y[:, 1].float().cpu(), rtol=0, atol=0)
    # dx of the constant channel is γ/sqrt(eps)·(dy − mean(dy)): ~1e6, compared relatively.
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


@pytest.mark.parametrize(
    "plan, channels_last",
    [("split-welford", False), ("split-welford", True), ("column-tiled", True), ("fused-small", False)],
)
def test_mean_near_the_top_of_fp32(plan, channels_last, device):
    # Mean 2e19, spread 1e17: the square of the mean overflows fp32 (above ~1.8e19), so no
    # statistic may square a mean, not even in the merge of a split's empty first accumulator.
    shape = (6, 3, 11, 13)
    inputs = make_inputs(shape, torch.float32, device, offset=2e19, scale=1e17, channels_last=channels_last)
    inputs["running_mean"] = inputs["running_mean"] + 2e19
    inputs["running_var"] = inputs["running_var"] * 1e34
    got = run_step(inputs, backend="triton", plan=plan)
    want = reference_step(inputs)
    for name in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        assert torch.isfinite(getattr(got, name)).all(), f"{name} has non-finite values"
    # x is stored to ulp(2e19) = 2.2e12, 2e-5 of its spread; dx is of size 1/spread.
    torch.testing.assert_close(got.y.double().cpu(), want.y.cpu(), rtol=0, atol=1e-3)
    torch.testing.assert_close(1e17 * got.dx.double().cpu(), 1e17 * want.dx.cpu(), rtol=0, atol=1e-3)
    torch.testing.assert_close(got.running_mean.double().cpu(), want.running_mean.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got.running_var.double().cpu(), want.running_var.cpu(), rtol=1e-4, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("plan", ["split-welford", "fused-small"])
def test_backward_with_subnormal_variance(plan):
    # var + eps ≈ 2e-40 is subnormal: invstd ≈ 7e19 is finite but invstd² is not, so the backward
    # must never form it. Interpreter only: compiled kernels may flush subnormals to zero (libdevice
    # is linked with ftz), and then no order of operations helps.
    shape = (7, 3, 5, 5)
    inputs = make_inputs(shape, torch.float32, "cpu", scale=1e-20)
    got = run_step(inputs, backend="triton", plan=plan, eps=1e-40)
    want = reference_step(inputs, eps=1e-40)
    assert torch.isfinite(got.dx).all(), "dx has non-finite values"
    # Subnormals keep ~5 significant digits at 1e-40: compare dx relatively.
    scale = want.dx.abs().max()
    torch.testing.assert_close(got.dx.double() / scale, want.dx / scale, rtol=0, atol=1e-3)


@pytest.mark.parametrize("plan", ["split-welford", "fused-small", "column-tiled"])
@pytest.mark.parametrize("affine, running", [(False, True), (True, False), (False, False)])
def test_optional_tensors(plan, affine, running, device):
    shape = (6, 3, 5, 5)
    inputs = make_inputs(shape, torch.float32, device, channels_last=plan == "column-tiled")
    got = run_step(inputs, backend="triton", plan=plan, affine=affine, running=running)
    want = reference_step(inputs, affine=affine, running=running)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


@pytest.mark.parametrize("plan", ["split-welford", "fused-small", "eval"])
@pytest.mark.parametrize("need_input, need_params", [(True, False), (False, True)])
def test_gradient_subsets(plan, need_input, need_params, device):
    shape = (5, 3, 4, 4)
    training = plan != "eval"
    inputs = make_inputs(shape, torch.float32, device)
    got = run_step(
        inputs, backend="triton", plan=plan, training=training, need_input=need_input, need_params=need_params
    )
    want = reference_step(inputs, training=training, need_input=need_input, need_params=need_params)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


@pytest.mark.parametrize("plan", ["split-welford", "fused-small", "column-tiled"])
def test_running_statistics_over_several_steps(plan, device):
    shape = (6, 4, 3, 3)
    channels_last = plan == "column-tiled"
    stats = {}
    for backend in ("triton", "reference"):
        dtype = torch.float32 if backend == "triton" else torch.float64
        running_mean = torch.zeros(4, dtype=dtype, device=device)
        running_var = torch.ones(4, dtype=dtype, device=device)
        for step in range(4):
            inputs = make_inputs(
                shape, torch.float32, device, channels_last=channels_last, offset=step, seed=step
            )
            x = inputs["x"].to(dtype)
            with tritonbn.backend(backend, plan=plan if backend == "triton" else None):
                tritonbn.batch_norm(x, running_mean, running_var, training=True, momentum=0.3)
        stats[backend] = (running_mean, running_var)
    for got, want in zip(stats["triton"], stats["reference"], strict=True):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-6)


def test_only_integer_ticket_atomics_in_the_kernels():
    # Determinism rests on this: every reduction is a fixed-order merge, never a float atomic; the
    # one atomic is the integer ticket that elects each channel group's last program.
    sources = sorted(Path(kernels_package.__file__).parent.glob("*.py"))
    assert sources
    for source in sources:
        for call in re.findall(r"tl\.atomic_\w+\([^,]*", source.read_text()):
            assert call == "tl.atomic_add(ticket_ptr + pid_k", f"{source.name}: {call}"


@pytest.mark.parametrize("plan, channels_last", [("split-welford", False), ("column-tiled", True)])
def test_tickets_are_reset_for_the_next_call(plan, channels_last, device):
    # The last program of each group resets its counter: the next call starts from zero.
    from tritonbn.kernels import workspace

    inputs = make_inputs((6, 5, 17, 9), torch.float32, device, channels_last=channels_last)
    for _ in range(2):
        run_step(inputs, backend="triton", plan=plan)
        run_step(inputs, backend="triton", plan=plan, training=False)
    assert workspace._tickets
    for counters in workspace._tickets.values():
        assert not counters.any(), counters


@pytest.mark.parametrize("plan, channels_last", [("split-welford", False), ("column-tiled", True)])
def test_a_captured_launch_gets_workspace_of_its_own(plan, channels_last, device, monkeypatch):
    # While a CUDA graph is captured, split launches get fresh counters, zero, and fresh partials:
    # the graph's own. The kept ones are neither used, grown nor replaced, and the step is right.
    from tritonbn.kernels import launch, workspace

    inputs = make_inputs((6, 5, 17, 9), torch.float32, device, channels_last=channels_last)
    run_step(inputs, backend="triton", plan=plan)  # the kept buffers of this stream exist
    kept = {name: dict(getattr(workspace, name)) for name in ("_tickets", "_partials")}
    assert all(kept.values())
    counters, used_kept = [], []
    original = launch.Launcher.__call__

    def noting(self, key, grid, args, meta):
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        counters.extend((t, bool(t.any())) for t in tensors if t.dtype == torch.int32)
        used_kept.extend(t for t in tensors if workspace.is_workspace(t))
        return original(self, key, grid, args, meta)

    monkeypatch.setattr(launch.Launcher, "__call__", noting)
    monkeypatch.setattr(workspace, "capturing", lambda device: True)
    got = run_step(inputs, backend="triton", plan=plan)
    assert_step_close(got, reference_step(inputs), torch.float32, reduced=_reduced(inputs["x"].shape))
    assert len(counters) >= 2, "no split launch (statistics and gradient sums) was made"
    assert not any(nonzero for _, nonzero in counters), counters
    assert len({id(tensor) for tensor, _ in counters}) == len(counters)
    assert not used_kept
    for name, before in kept.items():
        after = getattr(workspace, name)
        assert after.keys() == before.keys() and all(after[key] is before[key] for key in before), name


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the interpreter runs programs one after another: bits could not differ",
)
@pytest.mark.parametrize(
    "shape, channels_last, plan",
    [
        ((5, 3, 41, 43), False, "split-welford"),
        ((3, 13, 7, 7), True, "column-tiled"),
        ((9, 11, 7, 7), False, "fused-small"),
        ((64, 3, 127, 129), False, "split-welford"),
        ((512, 19, 23, 23), True, "column-tiled"),
    ],
)
def test_deterministic_bits(shape, channels_last, plan, device):
    # The last two shapes give many programs a channel group: whichever program finishes last
    # merges the partials, in a fixed order, so twenty runs give the same bits.
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last)
    first = run_step(inputs, backend="triton", plan=plan)
    for _ in range(20):
        again = run_step(inputs, backend="triton", plan=plan)
        for name in ("y", "dx", "dw", "db", "running_mean", "running_var"):
            a, b = getattr(first, name), getattr(again, name)
            assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float tensor the kernels allocate starts as NaN, so an unwritten element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.mark.parametrize(
    "shape, channels_last, plan, training",
    [
        ((3, 5, 41, 43), False, "split-welford", True),
        ((2, 67, 7, 9), True, "column-tiled", True),
        ((9, 11, 7, 7), False, "fused-small", True),
        ((3, 7, 3, 3), True, "fused-small", True),
        ((7, 3, 5, 5), False, "eval", False),
        ((37, 13), False, "eval", False),
    ],
)
def test_every_output_element_written(poisoned_outputs, shape, channels_last, plan, training, device):
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last)
    got = run_step(inputs, backend="triton", plan=plan, training=training)
    want = reference_step(inputs, training=training)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


def test_non_dense_input_is_copied_once(device):
    base = make_inputs((6, 3, 8, 10), torch.float32, device)
    strided = dict(base, x=base["x"][:, :, ::2, 1::3], grad=base["grad"][:, :, ::2, 1::3])
    plan = tritonbn.explain(strided["x"], backend="triton")
    assert plan.copies_input and describe(strided["x"]).name == "strided"
    got = run_step(strided, backend="triton")
    want = reference_step(strided)
    assert_step_close(got, want, torch.float32, reduced=_reduced(strided["x"].shape))


@pytest.mark.parametrize("plan", ["split-welford", "fused-small", "eval"])
def test_strided_per_channel_tensors(plan, device):
    # weight, bias and running statistics as every-other-element views: the kernels must read
    # the view's elements and write back only them, never the storage in between.
    training = plan != "eval"
    inputs = make_inputs((5, 3, 4, 4), torch.float32, device)
    want = reference_step(inputs, training=training)
    storage = {name: torch.full((6,), 7.0, device=device) for name in inputs if name not in ("x", "grad")}
    views = {}
    for name, buffer in storage.items():
        views[name] = buffer[::2]
        views[name].copy_(inputs[name].float())
    weight = views["weight"].requires_grad_()
    bias = views["bias"].requires_grad_()
    x = inputs["x"].clone().requires_grad_()
    with tritonbn.backend("triton", plan=plan):
        y = tritonbn.batch_norm(
            x, views["running_mean"], views["running_var"], weight, bias, training, 0.1, 1e-5
        )
    y.backward(inputs["grad"].float())
    torch.testing.assert_close(y.double(), want.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), want.dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), want.dw, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(views["running_mean"].double(), want.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(views["running_var"].double(), want.running_var, rtol=1e-5, atol=1e-6)
    for name, buffer in storage.items():
        assert torch.all(buffer[1::2] == 7.0), f"{name}: an element outside the view was written"


def test_gradient_with_other_strides(device):
    # sum() gives an expanded (stride-0) gradient; the backward copies it to x's strides.
    x = make_inputs((5, 3, 4, 4), torch.float32, device)["x"].requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    with tritonbn.backend("triton", plan="split-welford"):
        (tritonbn.batch_norm(x, None, None, training=True) * 3).sum().backward()
    (tritonbn.reference.batch_norm(x_ref, None, None, training=True) * 3).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, channels_last, plan",
    [
        ((3, 5, 41, 43), False, "split-welford"),
        ((2, 3, 5, 31, 7), False, "split-welford"),
        ((1031, 5), False, "column-tiled"),
        ((6, 13, 9, 11), True, "column-tiled"),
    ],
)
def test_programs_that_fold_several_tiles(shape, channels_last, plan, device):
    # On the interpreter's 4 SMs every other test gives each program one tile; with one SM and
    # 1,024-element tiles each program loops over several: forward, running statistics, backward.
    from tritonbn import kernels
    from tritonbn.kernels.plans import Tunables, geometry, plan_token

    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last, offset=0.5)
    x = inputs["x"]
    dy = torch.empty_like(x).copy_(inputs["grad"])  # the kernels take dy in x's strides
    tunables = Tunables(tile=1024)
    layout = describe(x)
    tiling = geometry(layout, channel_major=plan == "split-welford", sm_count=1, tunables=tunables)
    assert tiling.blocks_per_split > 1, tiling
    token = plan_token(plan, tunables)
    weight, bias = (inputs[name].float().to(device) for name in ("weight", "bias"))
    running_mean, running_var = (inputs[name].float().to(device) for name in ("running_mean", "running_var"))
    y, save = kernels.forward_train(
        x, weight, bias, running_mean, running_var, 0.1, 1e-5, plan=token, sm_count=1
    )
    dx, dweight, dbias = kernels.backward_train(
        dy, x, weight, save, (True, True, True), plan=token, sm_count=1, bias=bias
    )
    got = Step(y, dx, dweight, dbias, running_mean, running_var)
    assert_step_close(got, reference_step(inputs), torch.float32, reduced=_reduced(shape))


def _misaligned(t):
    """A copy of ``t``, strides and all, whose data pointer is one element past a 16-byte
    boundary (Triton then cannot assume its rows aligned, whatever the strides say)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = storage[1:].as_strided(t.shape, t.stride()).copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# (shape, channels_last, plan, Geometry.align): spatial extents and channel counts that are
# multiples of 2, 4 or 8 but not of 16, so that the kernels show the compiler runs of that many
# aligned elements (tiling.tile_offsets); ragged batches.
ALIGNED_CASES = [
    ((3, 5, 14, 14), False, "split-welford", 4),  # S = 196, ResNet's 14×14
    ((3, 5, 14, 14), False, "fused-small", 4),
    ((3, 5, 14, 14), False, "eval", 4),
    ((5, 3, 7, 2), False, "split-welford", 2),  # S = 14
    ((37, 12), False, "column-tiled", 4),  # rows of C = 12 (LeNet's 84 and 120 alike)
    ((9, 24), False, "fused-small", 8),
    ((3, 12, 3, 5), True, "column-tiled", 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("shape, channels_last, plan, align", ALIGNED_CASES)
def test_aligned_runs(shape, channels_last, plan, align, misaligned, dtype, device):
    # Whole vectors of `align` elements where the data pointers are 16-byte aligned; with the
    # input and its gradient one element off a boundary, those two are read element by element
    # (Triton specializes pointers on their alignment): either way, the reference's results.
    from tritonbn.kernels.plans import KERNEL_PLANS, geometry

    training = plan != "eval"
    inputs = make_inputs(shape, dtype, device, channels_last=channels_last)
    layout = describe(inputs["x"])
    kernel_plan = KERNEL_PLANS[plan]
    tiling = geometry(
        layout,
        channel_major=kernel_plan.channel_major(layout),
        sm_count=4,
        single_tile=kernel_plan.single_tile,
    )
    assert tiling.align == align, tiling
    if misaligned:
        inputs["x"] = _misaligned(inputs["x"])
        inputs["grad"] = _misaligned(torch.empty_like(inputs["x"]).copy_(inputs["grad"]))
        assert not tritonbn.explain(inputs["x"], training=training, backend="triton").copies_input
    got = run_step(inputs, backend="triton", plan=plan, training=training)
    want = reference_step(inputs, training=training)
    assert_step_close(got, want, dtype, reduced=_reduced(shape))


@pytest.mark.parametrize(
    "shape, channels_last, channel_major, align",
    [
        ((32, 64, 14, 14), False, True, 4),  # S = 196
        ((32, 64, 56, 56), False, True, 16),  # S = 3,136: Triton's specialization says it
        ((32, 64, 7, 7), False, True, 1),  # S = 49
        ((256, 120), False, False, 8),
        ((256, 84), False, False, 4),
        ((256, 84), False, True, 1),  # one element a row
        ((8, 12, 3, 5), True, False, 4),  # channels_last: rows of C = 12
        ((8, 12, 3, 5), True, True, 1),  # tiled channel-major: no contiguous run along k
    ],
)
def test_geometry_alignment(shape, channels_last, channel_major, align):
    from tritonbn.kernels.plans import geometry

    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert geometry(describe(x), channel_major=channel_major, sm_count=132).align == align


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape, channels_last, plan",
    [
        ((5, 3, 9, 7), False, "split-welford"),
        ((5, 3, 9, 7), True, "fused-small"),
        ((37, 13), False, "column-tiled"),
    ],
)
def test_large_eps(shape, channels_last, plan, training, device):
    # eps = 0.5 against variances of 0.01: an eps dropped or added twice moves every result by
    # a factor, where the default eps = 1e-5 would hide it under the tolerance.
    inputs = make_inputs(shape, torch.float32, device, channels_last=channels_last, scale=0.1)
    inputs["running_var"] = inputs["running_var"] * 0.01
    got = run_step(inputs, backend="triton", plan=plan if training else None, training=training, eps=0.5)
    want = reference_step(inputs, training=training, eps=0.5)
    assert_step_close(got, want, torch.float32, reduced=_reduced(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((6, 3, 7, 7), False), ((5, 3, 5, 5), True), ((4, 5, 11), False), ((33, 6), False)],
)
def test_half_inputs_in_eval(shape, channels_last, dtype, param_dtype, device):
    inputs = make_inputs(shape, dtype, device, channels_last=channels_last)
    pdtype = torch.float32 if param_dtype == "float32" else dtype
    got = run_step(inputs, backend="triton", training=False, param_dtype=pdtype)
    assert got.y.dtype == dtype and got.dx.dtype == dtype and got.dw.dtype == pdtype
    want = reference_step(inputs, training=False)
    assert_step_close(got, want, dtype, reduced=_reduced(shape), param_dtype=pdtype)


def test_int64_offsets_forced(device):
    # The 64-bit index path on a small tensor: same results as the reference.
    from tritonbn import kernels

    inputs = make_inputs((5, 3, 7, 7), torch.float32, device)
    want = reference_step(inputs, affine=False, running=False)
    for plan in ("split-welford", "fused-small"):
        y, save = kernels.forward_train(
            inputs["x"], None, None, None, None, 0.1, 1e-5, plan=plan, sm_count=4, force_int64=True
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
        )
        torch.testing.assert_close(dx.double(), want.dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2**16, 2**15 + 1), True),
        ((4096, 64, 112, 112), True),
        ((1024, 64, 112, 112), False),
        ((256, 6, 24, 24), False),
        ((2**15, 2**16), True),
        ((2**15, 2**16 - 64), False),
        ((2**15, 2**16 - 16), True),
    ],  # 2**31 - 2**19 elements: int32 would do, the margin says int64
)
def test_int64_decision(shape, expected):
    # Shapes of 2**31 elements and more need 64-bit offsets; meta tensors allocate nothing.
    assert describe(torch.empty(shape, device="meta")).needs_int64 is expected


def test_explain_names_different_plans():
    cases = {
        (256, 6, 24, 24): "split-welford",
        (256, 16, 8, 8): "fused-small",
        (256, 120): "fused-small",
        (8192, 1024): "column-tiled",
    }
    for shape, plan in cases.items():
        assert tritonbn.explain(torch.empty(shape), backend="triton").kernel == plan
    cl = torch.empty(32, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    assert tritonbn.explain(cl, backend="triton").kernel == "column-tiled"
    assert tritonbn.explain(cl, training=False, backend="triton").kernel == "eval"


@given(
    n=st.integers(2, 9),
    c=st.integers(1, 9),
    spatial=st.sampled_from([(), (1,), (5,), (1, 1), (3, 3), (4, 7), (9, 9)]),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_follow_the_reference(n, c, spatial, channels_last, dtype, training, seed):
    shape = (n, c, *spatial)
    channels_last = channels_last and len(shape) == 4
    inputs = make_inputs(shape, dtype, DEVICE, channels_last=channels_last, seed=seed)
    x = inputs["x"]
    plans = [None] if not training else [None, "split-welford", "fused-small"]
    if training and describe(x).rows_collapse:
        plans.append("column-tiled")
    want = reference_step(inputs, training=training)
    for plan in plans:
        got = run_step(inputs, backend="triton", plan=plan, training=training)
        assert_step_close(got, want, dtype, reduced=_reduced(shape))
