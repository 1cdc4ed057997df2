"""The installed torch and Triton decide what tritonbn offers: features a newer torch brings are
detected, and on an older torch tritonbn's modules behave as that torch's own do. Runs on both
version pairs CI tests (see noxfile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn import _compat
from tritonbn.kernels import runtime

MODULES = [
    (tritonbn.BatchNorm1d, nn.BatchNorm1d),
    (tritonbn.BatchNorm2d, nn.BatchNorm2d),
    (tritonbn.SyncBatchNorm, nn.SyncBatchNorm),
]


def _torch_takes_bias() -> bool:
    try:
        nn.BatchNorm2d(3, bias=False)
    except TypeError:
        return False
    return True


def test_bias_argument_is_detected_as_torch_has_it():
    assert _torch_takes_bias() == _compat.BATCHNORM_HAS_BIAS_ARG


@pytest.mark.parametrize(("cls", "torch_cls"), MODULES)
def test_bias_false_behaves_as_this_torchs_batchnorm(cls, torch_cls):
    if not _torch_takes_bias():
        with pytest.raises(TypeError):
            torch_cls(3, bias=False)
        with pytest.raises(TypeError, match=r"'bias' needs torch >= 2\.14.*got bias=False"):
            cls(3, bias=False)
        return
    module, oracle = cls(3, bias=False), torch_cls(3, bias=False)
    assert module.bias is None and oracle.bias is None
    assert module.state_dict().keys() == oracle.state_dict().keys()


@pytest.mark.parametrize(("cls", "torch_cls"), MODULES)
def test_default_module_has_this_torchs_state(cls, torch_cls):
    module, oracle = cls(5), torch_cls(5)
    assert {k: (v.shape, v.dtype) for k, v in module.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in oracle.state_dict().items()
    }


def test_eval_zero_eps_is_detected_as_torch_has_it():
    args = (torch.randn(4, 3), torch.zeros(3), torch.ones(3))
    try:
        F.batch_norm(*args, training=False, eps=0.0)
    except ValueError:
        accepted = False
    else:
        accepted = True
    assert accepted == _compat.EVAL_ACCEPTS_ZERO_EPS


@pytest.mark.skipif(not runtime.interpreted(), reason="the kernels are compiled, not interpreted")
def test_interpreter_runs_loops_over_kernel_arguments():
    # split-welford loops over a run-time tile count: Triton 3.6's interpreter needs the fix in
    # kernels/runtime.py under NumPy >= 2.4. Two splits a channel make the loop run.
    x = torch.randn(64, 2, 33, 33)
    with tritonbn.backend("triton", plan="split-welford"):
        y = tritonbn.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), rtol=1e-4, atol=1e-4)


def _run_blocked(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` raises ImportError,
    as on a platform without their wheels."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_and_cpu_fallback_without_triton():
    result = _run_blocked(
        ("triton",),
        """
        import torch, tritonbn
        module = tritonbn.BatchNorm2d(3)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        module(x).sum().backward()
        assert x.grad is not None and module.num_batches_tracked.item() == 1
        plan = tritonbn.explain(torch.randn(4, 3, 5, 5))
        assert plan.backend == "torch" and "Triton is not installed" in plan.reason, plan
        forced = tritonbn.explain(torch.randn(4, 3, 5, 5), backend="triton")
        assert "Triton is not installed" in forced.facts["runnable here"], forced
        try:
            with tritonbn.backend("triton"):
                tritonbn.batch_norm(x, None, None, training=True)
        except RuntimeError as error:
            assert "needs the Triton kernels" in str(error)
        else:
            raise AssertionError("backend 'triton' ran without Triton")
        assert sys.modules["triton"] is None
        print("ok")
    """,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_trainer_names_its_missing_extra():
    result = _run_blocked(
        ("tqdm",),
        """
        from tritonbn.train import main
        raise SystemExit(main(["--epochs", "1"]))
    """,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "missing here: tqdm" in result.stderr and "pip install 'tritonbn[train]'" in result.stderr
