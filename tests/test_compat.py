"""The installed torch and Triton decide what tritonbn offers: features a newer torch brings are
detected, and on an older torch tritonbn's modules behave as that torch's own do. Runs on both
version pairs CI tests (see noxfile.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn import _compat
from tritonbn.kernels import runtime

MODULES = [(tritonbn.BatchNorm1d, nn.BatchNorm1d), (tritonbn.BatchNorm2d, nn.BatchNorm2d),
           (tritonbn.SyncBatchNorm, nn.SyncBatchNorm)]


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
