"""The dispatcher and tritonbn.explain: which backend and kernel plan run a call, how the choice is
forced (environment, context manager), and that calls really run where the plan says."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._prims_common import suggest_memory_format

import tritonbn
import tritonbn.dispatch
import tritonbn.functional
from tritonbn.kernels.layout import format_strides, output_format, same_strides

from .helpers import assert_close


def cpu_input(*shape: int) -> torch.Tensor:
    return torch.randn(shape)


def test_auto_on_cpu_runs_torch_with_a_reason():
    plan = tritonbn.explain(cpu_input(8, 6, 4, 4))
    assert plan.backend == "torch"
    assert plan.kernel is None
    assert "cpu" in plan.reason


@pytest.mark.parametrize("name", ["torch", "reference", "triton"])
def test_environment_forces_backend(monkeypatch, name):
    monkeypatch.setenv("TRITONBN_BACKEND", name)
    plan = tritonbn.explain(cpu_input(8, 6, 4, 4))
    assert plan.backend == name
    if name != "triton":
        assert "TRITONBN_BACKEND" in plan.reason


def test_environment_forces_plan(monkeypatch):
    monkeypatch.setenv("TRITONBN_BACKEND", "triton")
    monkeypatch.setenv("TRITONBN_PLAN", "split-welford")
    assert tritonbn.explain(cpu_input(8, 6, 4, 4)).kernel == "split-welford"


def test_environment_is_read_on_every_call(monkeypatch):
    x = cpu_input(8, 6, 4, 4)
    for value, expected in (("reference", "reference"), ("", "torch"), ("triton", "triton"), (None, "torch")):
        if value is None:
            monkeypatch.delenv("TRITONBN_BACKEND", raising=False)
        else:
            monkeypatch.setenv("TRITONBN_BACKEND", value)
        assert tritonbn.explain(x).backend == expected
        # A call's own decision (the CPU fast path of select_plan) reads it too.
        if expected != "triton" or tritonbn.dispatch.launches_cpu_tensors():
            assert tritonbn.dispatch.select_plan(x, True).backend == expected
    monkeypatch.setenv("TRITONBN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"TRITONBN_BACKEND must be one of .*got 'cuda'"):
        tritonbn.dispatch.select_plan(x, True)
    # The dispatcher's quick read agrees with os.environ on unset, empty and non-ASCII values.
    for value in (None, "", "plan-é"):
        if value is None:
            monkeypatch.delenv("TRITONBN_PLAN", raising=False)
        else:
            monkeypatch.setenv("TRITONBN_PLAN", value)
        assert tritonbn.dispatch._environment("TRITONBN_PLAN") == os.environ.get("TRITONBN_PLAN")


def test_context_manager_wins_over_environment(monkeypatch):
    monkeypatch.setenv("TRITONBN_BACKEND", "reference")
    x = cpu_input(4, 3, 2, 2)
    with tritonbn.backend("torch"):
        plan = tritonbn.explain(x)
    assert plan.backend == "torch"
    assert "tritonbn.backend()" in plan.reason
    assert tritonbn.explain(x).backend == "reference"


def test_nested_context_managers_restore_the_outer_choice():
    x = cpu_input(4, 3, 2, 2)
    with tritonbn.backend("reference"):
        with tritonbn.backend("triton", plan="split-welford"):
            assert tritonbn.explain(x).kernel == "split-welford"
        assert tritonbn.explain(x).backend == "reference"
        with pytest.raises(KeyError), tritonbn.backend("torch"):
            raise KeyError("the block fails")
        assert tritonbn.explain(x).backend == "reference"
    assert tritonbn.explain(x) == tritonbn.explain(cpu_input(4, 3, 2, 2))
    assert tritonbn.explain(x).backend == "torch"


@pytest.mark.parametrize(
    ("name", "plan", "match"),
    [
        ("cuda", None, r"backend name must be one of auto, triton, torch, reference, got 'cuda'"),
        (
            "triton",
            "fastest",
            r"plan must be one of eval, fused-small, column-tiled, split-welford, "
            r"got 'fastest'",
        ),
        ("torch", "eval", r"a kernel plan can only be forced with backend 'triton', got 'torch'"),
    ],
    ids=["bad-backend", "bad-plan", "plan-without-triton"],
)
def test_context_manager_rejects_bad_names(name, plan, match):
    with pytest.raises(ValueError, match=match), tritonbn.backend(name, plan=plan):
        pass


def test_explain_rejects_unknown_options():
    with pytest.raises(TypeError, match=r"unexpected options \['kernel'\]"):
        tritonbn.explain(cpu_input(4, 3), kernel="eval")


def test_explain_prints_a_readable_report():
    report = str(tritonbn.explain(cpu_input(8, 6, 5, 7)))
    lines = report.splitlines()
    assert lines[0] == "tritonbn plan: backend=torch"
    for line in (
        "device: cpu",
        "dtype: float32",
        "layout: nchw",
        "shape: (8, 6, 5, 7)",
        "N: 8",
        "C: 6",
        "spatial: 35",
        "per_channel: 280",
        "training: True",
    ):
        assert f"  {line}" in lines, line
    assert lines[1].startswith("  reason: cpu tensor")


def test_explain_names_a_kernel_plan_for_triton():
    plan = tritonbn.explain(cpu_input(8, 6, 5, 7), backend="triton")
    assert plan.backend == "triton"
    assert plan.kernel in tritonbn.PLANS
    assert str(plan).splitlines()[0] == f"tritonbn plan: backend=triton, kernel={plan.kernel}"


@pytest.mark.parametrize(
    ("shape", "channels_last", "training", "kernel", "layout"),
    [
        ((256, 6, 24, 24), False, True, "split-welford", "nchw"),  # LeNet conv1: few channels, big slabs
        ((256, 16, 8, 8), False, True, "fused-small", "nchw"),  # LeNet conv2: one slab fits a program
        ((256, 120), False, True, "fused-small", "2d"),  # LeNet fc1
        ((8192, 1024), False, True, "column-tiled", "2d"),
        ((32, 64, 56, 56), True, True, "column-tiled", "channels_last"),
        ((256, 6, 24, 24), False, False, "eval", "nchw"),
        # One spatial element: an (N, C) matrix; small enough for one program per 4 channels.
        ((4096, 64, 1, 1), False, True, "fused-small", "2d"),
    ],
    ids=["lenet-conv1", "lenet-conv2", "lenet-fc1", "large-2d", "channels-last", "eval", "spatial-1"],
)
def test_plan_for_shape(shape, channels_last, training, kernel, layout):
    # An unfilled tensor: the dispatcher reads shapes and strides, never values.
    x = torch.empty(shape, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    plan = tritonbn.explain(x, training=training, backend="triton")
    assert (plan.kernel, plan.facts["layout"]) == (kernel, layout)
    assert not plan.copies_input
    assert (plan.facts["N"], plan.facts["C"]) == shape[:2]


def test_explain_reports_a_triton_plan_that_cannot_run_here(monkeypatch):
    monkeypatch.setattr(tritonbn.dispatch, "launches_cpu_tensors", lambda: False)
    plan = tritonbn.explain(cpu_input(8, 6, 5, 7), backend="triton")
    assert plan.backend == "triton" and plan.kernel in tritonbn.PLANS
    assert str(plan.facts["runnable here"]).startswith("no (backend 'triton' got a cpu tensor")
    with tritonbn.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tritonbn.batch_norm(cpu_input(8, 6, 5, 7), None, None, training=True)


def test_decision_depends_on_shape_not_values():
    a, b = torch.zeros(16, 5, 9, 9), torch.randn(16, 5, 9, 9) * 1e6
    assert tritonbn.explain(a, backend="triton") == tritonbn.explain(b, backend="triton")


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("column-tiled", (4, 3, 5, 5), r"plan 'column-tiled' needs rows at one stride apart"),
        ("fused-small", (512, 3, 16, 16), r"plan 'fused-small' needs a per-program tile of at most"),
        ("eval", (4, 3, 5, 5), r"plan 'eval' .*training must be False"),
    ],
    ids=["column-tiled-on-nchw", "fused-small-too-big", "eval-in-training"],
)
def test_forced_plan_that_does_not_fit_raises(name, shape, match):
    with pytest.raises(ValueError, match=match):
        tritonbn.explain(torch.empty(shape), plan=name)


def test_forced_training_plan_in_eval_runs_eval():
    plan = tritonbn.explain(cpu_input(4, 3, 5, 5), training=False, plan="split-welford")
    assert plan.kernel == "eval"
    assert "forced" in plan.reason


@pytest.mark.parametrize(
    ("x", "why"),
    [
        (torch.empty(0, 3, 4, 4), "empty batch"),
        (torch.empty(4, 3, 4, 4, dtype=torch.float64), "float64"),
    ],
)
def test_triton_backend_falls_back_to_torch(x, why):
    plan = tritonbn.explain(x, backend="triton")
    assert plan.backend == "torch"
    assert why in plan.reason


@pytest.mark.interpreter
def test_strided_input_is_copied_and_still_correct():
    base = torch.randn(4, 10, 5, 6)
    x = base[:, ::2, :, 1:]  # every other channel, a column cut off: not dense
    plan = tritonbn.explain(x, backend="triton")
    assert plan.copies_input
    assert plan.facts["layout"] == "strided"
    assert "copied" in str(plan)
    running = [torch.zeros(5), torch.ones(5)]
    torch_running = [torch.zeros(5), torch.ones(5)]
    with tritonbn.backend("triton"):
        y = tritonbn.batch_norm(x, *running, training=True)
    want = F.batch_norm(x.double(), *[t.double() for t in torch_running], training=True)
    assert_close(y, want, torch.float32, "output")
    assert y.shape == x.shape
    F.batch_norm(x, *torch_running, training=True)
    assert_close(running[0], torch_running[0], torch.float32, "running_mean")
    assert_close(running[1], torch_running[1], torch.float32, "running_var")


class Spy:
    """Counts calls to a function it forwards to."""

    def __init__(self, target):
        self.target = target
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)


@pytest.mark.parametrize(
    "name", ["torch", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_call_runs_on_the_backend_the_plan_names(monkeypatch, name):
    spies = {
        "torch": Spy(F.batch_norm),
        "reference": Spy(tritonbn.reference.batch_norm),
        "triton": Spy(tritonbn.functional.triton_batch_norm),
    }
    monkeypatch.setattr(tritonbn.functional.F, "batch_norm", spies["torch"])
    monkeypatch.setattr(tritonbn.functional.reference, "batch_norm", spies["reference"])
    monkeypatch.setattr(tritonbn.functional, "triton_batch_norm", spies["triton"])
    x = cpu_input(4, 3, 2, 2)
    with tritonbn.backend(name):
        assert tritonbn.explain(x).backend == name
        tritonbn.batch_norm(x, None, None, training=True)
    assert {key: spy.calls for key, spy in spies.items()} == {key: int(key == name) for key in spies}


@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    order=st.randoms(use_true_random=False),
    step=st.integers(1, 2),
)
def test_output_format_is_torchs_suggested_memory_format(shape, order, step):
    # The dispatcher copies an input whose strides torch would not give its output; it must read
    # the strides as torch does (c10's channels-last test, its tie-breaks on size-1 dims included).
    perm = list(range(len(shape)))
    order.shuffle(perm)
    base = torch.empty([shape[p] * (step if i == 0 else 1) for i, p in enumerate(perm)])
    x = base[::step].permute([perm.index(d) for d in range(len(shape))])
    want = suggest_memory_format(x)
    assert output_format(tuple(x.shape), tuple(x.stride())) == want
    y = torch.empty_like(x, memory_format=want)
    assert same_strides(tuple(x.shape), format_strides(tuple(x.shape), want), tuple(y.stride()))
