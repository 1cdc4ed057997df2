"""Shared machinery of the API tests: dtype tolerances, torch-module twins of tritonbn modules,
one training/eval step run on both, and snapshots proving that a failed call mutated nothing."""

from __future__ import annotations

import torch
from torch import nn

from .kernel_cases import TOLERANCES, Step

BACKENDS = ("torch", "reference", "triton")


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` for comparing a result computed in ``dtype`` with a float64 oracle."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    dtype: torch.dtype,
    what: str,
    *,
    reduced: int = 1,
) -> None:
    """``actual`` (computed in ``dtype``) equals ``expected`` to ``dtype``'s tolerance, compared in
    float64; both None also passes. ``reduced`` is the length of a sum behind the values: its
    rounding grows like a random walk, so the absolute tolerance grows with sqrt(reduced)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual!r} vs {expected!r}"
        return
    tol = tolerance(dtype)
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        rtol=tol["rtol"],
        atol=tol["atol"] * max(1.0, reduced**0.5),
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def randomize_state(module: nn.modules.batchnorm._BatchNorm, seed: int = 1) -> None:
    """Give ``module`` non-default affine parameters and running statistics (variance > 0), so
    that a state copy which silently kept the defaults would be caught."""
    gen = torch.Generator().manual_seed(seed)
    c = module.num_features
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64))
        if module.bias is not None:
            module.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if module.track_running_stats:
            module.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
            module.num_batches_tracked.fill_(3)


def twin_modules(
    tritonbn_cls: type, torch_cls: type, num_features: int, dtype: torch.dtype, **options: object
) -> tuple[nn.Module, nn.Module]:
    """(tritonbn module in ``dtype``, float64 torch module) with the same options and the same
    (randomized) state, copied through a strict ``load_state_dict``."""
    oracle = torch_cls(num_features, dtype=torch.float64, **options)
    randomize_state(oracle)
    module = tritonbn_cls(num_features, dtype=dtype, **options)
    module.load_state_dict(oracle.state_dict(), strict=True)
    return module, oracle


def module_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> Step:
    """Forward ``x`` cast to ``dtype`` through ``module`` and backward ``dy``: the module form of
    ``kernel_cases.run_step`` (which calls the functional API), with the same :class:`Step`
    result, the running statistics being the module's buffers."""
    x = x.detach().to(dtype).requires_grad_(True)
    y = module(x)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    params = [p for p in (weight, bias) if p is not None]
    grads = iter(torch.autograd.grad(y, [x, *params], dy.to(y.dtype)))
    dx = next(grads)
    dweight = None if weight is None else next(grads)
    dbias = None if bias is None else next(grads)
    return Step(
        y.detach(),
        dx,
        dweight,
        dbias,
        getattr(module, "running_mean", None),
        getattr(module, "running_var", None),
    )


def assert_modules_match(
    module: nn.Module, oracle: nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype
) -> None:
    """One step on both modules: output, input/weight/bias gradients and every buffer agree to
    ``dtype``'s tolerance, and the output keeps the input's memory format. Both see ``x`` and
    ``dy`` rounded to ``dtype``, so only the computation's rounding is measured."""
    x, dy = x.to(dtype).double(), dy.to(dtype).double()
    got, want = module_step(module, x, dy, dtype), module_step(oracle, x, dy, torch.float64)
    reduced = x.numel() // x.shape[1]
    assert got.y.dtype == dtype
    assert got.y.stride() == x.stride(), "the output must keep the input's memory format"
    assert_close(got.y, want.y, dtype, "output")
    assert_close(got.dx, want.dx, dtype, "grad input")
    assert_close(got.dw, want.dw, dtype, "grad weight", reduced=reduced)
    assert_close(got.db, want.db, dtype, "grad bias", reduced=reduced)
    assert_close(module.running_mean, oracle.running_mean, dtype, "running_mean")
    assert_close(module.running_var, oracle.running_var, dtype, "running_var")
    if oracle.num_batches_tracked is None:
        assert module.num_batches_tracked is None
    else:
        assert torch.equal(module.num_batches_tracked, oracle.num_batches_tracked)


def snapshot(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Copies of ``tensors`` to compare with later (None stays None)."""
    return [None if t is None else t.detach().clone() for t in tensors]


def assert_unchanged(before: list[torch.Tensor | None], *tensors: torch.Tensor | None) -> None:
    """Every tensor still holds exactly the values (NaN included) recorded by ``snapshot``."""
    assert len(before) == len(tensors)
    for old, new in zip(before, tensors, strict=True):
        if old is None:
            assert new is None
        else:
            torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)


def module_state(module: nn.Module) -> list[torch.Tensor | None]:
    """Snapshot of a batch-norm module's running statistics and batch counter."""
    return snapshot(module.running_mean, module.running_var, module.num_batches_tracked)


def assert_module_unchanged(before: list[torch.Tensor | None], module: nn.Module) -> None:
    """The module's running statistics and batch counter are exactly as ``module_state`` saw them."""
    assert_unchanged(before, module.running_mean, module.running_var, module.num_batches_tracked)
