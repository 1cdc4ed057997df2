"""tritonbn.reference, the plain-torch oracle, against torch.nn.functional.batch_norm in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tritonbn import reference

from .helpers import assert_close, snapshot

# (shape, memory format): 2-D to 5-D, and the channels-last layouts of 4-D and 5-D input.
SHAPES = [
    ((6, 3), torch.contiguous_format),
    ((4, 3, 7), torch.contiguous_format),
    ((3, 4, 5, 6), torch.contiguous_format),
    ((3, 4, 5, 6), torch.channels_last),
    ((2, 3, 3, 4, 5), torch.contiguous_format),
    ((2, 3, 3, 4, 5), torch.channels_last_3d),
]
SHAPE_IDS = ["2d", "3d", "4d", "4d-channels-last", "5d", "5d-channels-last"]


def make_args(
    shape: tuple[int, ...],
    memory_format: torch.memory_format,
    dtype=torch.float64,
    param_dtype=torch.float64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Input with a non-zero mean, affine parameters and running statistics, all random."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (0.5 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    return {
        "input": x.contiguous(memory_format=memory_format),
        "weight": (1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)).to(param_dtype),
        "bias": torch.randn(c, generator=gen, dtype=torch.float64).to(param_dtype),
        "running_mean": torch.randn(c, generator=gen, dtype=torch.float64).to(param_dtype),
        "running_var": (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(param_dtype),
        "grad": torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype),
    }


def call(
    fn,
    args: dict[str, torch.Tensor],
    *,
    training: bool,
    affine: tuple[bool, bool],
    running: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
):
    """Run ``fn`` (a batch_norm) on private copies of ``args``; returns (y, grads, running stats)."""
    x = args["input"].detach().clone().requires_grad_(True)
    weight = args["weight"].clone().requires_grad_(True) if affine[0] else None
    bias = args["bias"].clone().requires_grad_(True) if affine[1] else None
    running_mean, running_var = (
        snapshot(args["running_mean"], args["running_var"]) if running else (None, None)
    )
    y = fn(x, running_mean, running_var, weight, bias, training, momentum, eps)
    wants = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(y, wants, args["grad"])
    return y, grads, (running_mean, running_var)


@pytest.mark.parametrize(("shape", "memory_format"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(
    "affine",
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["weight+bias", "weight", "bias", "no-affine"],
)
# Eval without running statistics is an error (tests/test_errors.py).
@pytest.mark.parametrize(
    ("training", "running"),
    [(True, True), (True, False), (False, True)],
    ids=["train", "train-no-running-stats", "eval"],
)
def test_matches_torch_in_float64(shape, memory_format, training, affine, running):
    args = make_args(shape, memory_format)
    y, grads, stats = call(reference.batch_norm, args, training=training, affine=affine, running=running)
    y_t, grads_t, stats_t = call(F.batch_norm, args, training=training, affine=affine, running=running)
    assert_close(y, y_t, torch.float64, "output")
    assert y.is_contiguous(memory_format=memory_format), "the output must keep the input's layout"
    for name, got, want in zip(("input", "weight", "bias"), grads, grads_t, strict=False):
        assert_close(got, want, torch.float64, f"grad {name}")
    assert_close(stats[0], stats_t[0], torch.float64, "running_mean")
    assert_close(stats[1], stats_t[1], torch.float64, "running_var")


@pytest.mark.parametrize("momentum", [0.0, 0.25, 1.0])
def test_running_stats_update_uses_unbiased_variance_and_momentum_on_new_batch(momentum):
    args = make_args((5, 3, 2, 2), torch.contiguous_format)
    x = args["input"]
    old_mean, old_var = snapshot(args["running_mean"], args["running_var"])
    running_mean, running_var = snapshot(args["running_mean"], args["running_var"])
    reference.batch_norm(x, running_mean, running_var, training=True, momentum=momentum)
    dims = (0, 2, 3)
    # momentum weighs the new batch; the running variance receives the unbiased (m-1) estimate.
    want_mean = (1 - momentum) * old_mean + momentum * x.mean(dims)
    want_var = (1 - momentum) * old_var + momentum * x.var(dims, unbiased=True)
    assert_close(running_mean, want_mean, torch.float64, "running_mean")
    assert_close(running_var, want_var, torch.float64, "running_var")


def test_training_normalizes_with_biased_variance():
    args = make_args((4, 2, 3), torch.contiguous_format)
    x = args["input"]
    y = reference.batch_norm(x, None, None, training=True, eps=1e-3)
    dims = (0, 2)
    want = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + 1e-3)
    assert_close(y, want, torch.float64, "output")


def test_eval_normalizes_with_running_stats_and_leaves_them_alone():
    args = make_args((4, 3, 5), torch.contiguous_format)
    before = snapshot(args["running_mean"], args["running_var"])
    y = reference.batch_norm(args["input"], args["running_mean"], args["running_var"], training=False)
    shape = (1, 3, 1)
    want = (args["input"] - before[0].view(shape)) / torch.sqrt(before[1].view(shape) + 1e-5)
    assert_close(y, want, torch.float64, "output")
    assert torch.equal(args["running_mean"], before[0]) and torch.equal(args["running_var"], before[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training):
    args = make_args((3, 2, 2), torch.contiguous_format)
    x = args["input"].requires_grad_(True)
    weight = args["weight"].requires_grad_(True)
    bias = args["bias"].requires_grad_(True)
    # In training the running statistics are left out: gradcheck calls the function many times and
    # each call would move them.
    running_mean = None if training else args["running_mean"]
    running_var = None if training else args["running_var"]

    def fn(x, weight, bias):
        return reference.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-3)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_input_returns_input_dtype(dtype, training):
    args = make_args((4, 3, 3, 3), torch.contiguous_format, dtype=dtype, param_dtype=torch.float32)
    y, _, stats = call(reference.batch_norm, args, training=training, affine=(True, True), running=True)
    y_t, _, stats_t = call(F.batch_norm, args, training=training, affine=(True, True), running=True)
    assert y.dtype == dtype
    assert stats[0].dtype == torch.float32 and stats[1].dtype == torch.float32
    assert_close(y, y_t, dtype, "output")
    assert_close(stats[0], stats_t[0], torch.float32, "running_mean")
    assert_close(stats[1], stats_t[1], torch.float32, "running_var")
