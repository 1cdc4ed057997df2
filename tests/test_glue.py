"""The C++ glue of the eager path (tritonbn/glue.py, csrc/eager_glue.cpp, kernels/replay.py).

Its replays need compiled kernels, so these tests run Triton's real launch path under the
stand-in CUDA driver (bench/standin_cuda.py), where nothing executes: what they prove is that
the glue launches exactly what the Python path launches — the same launchers, grids and
arguments, each pointer the same tensor's — step after step, forward and backward, for every
plan, mode and combination of gradients. On a GPU the whole suite runs over the glue as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonbn import glue

BENCH = Path(__file__).resolve().parents[1] / "bench"

needs_standin = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("c++") is None or torch.cuda.is_available(),
    reason="the stand-in CUDA driver and the glue are built with gcc/c++, and only without CUDA",
)

# Runs a few steps of one module through the Python path and of its twin through the glue, logs
# every launch of the last step's forward and backward (launcher arguments with pointers named
# by the tensor they point into) and prints both logs.
SAME_LAUNCHES = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import standin_cuda
standin_cuda.install()
import torch
import tritonbn
from tritonbn.kernels import launch

log = []
original_init = launch._Record.__init__

def logged_record(self, compiled, grid, constants):
    original_init(self, compiled, grid, constants)
    run = self.run

    def logged(*args):
        log.append(args)
        return run(*args)

    self.run = logged

launch._Record.__init__ = logged_record

def named(args, names):
    out = []
    for value in args:
        if isinstance(value, torch.Tensor):
            value = value.data_ptr()
        if isinstance(value, int) and not isinstance(value, bool) and value > 1 << 20:
            value = names.setdefault(value, f"internal{len(names)}")
        out.append(value if isinstance(value, (int, float, str, type(None), bool)) else repr(type(value)))
    return out

def run(case, use_glue):
    os.environ["TRITONBN_GLUE"] = "auto" if use_glue else "off"
    shape, cls, training, activation, needs = case
    torch.manual_seed(0)
    module = getattr(tritonbn, cls)(shape[1], activation=activation)
    module.train(training)
    module.weight.requires_grad_(needs[1])
    module.bias.requires_grad_(needs[2])
    x = torch.randn(shape).requires_grad_(needs[0])
    dy = torch.randn(shape)
    with tritonbn.backend("triton"):
        for step in range(4):
            del log[:]
            y = module(x)
            forward = list(log)
            del log[:]
            y.backward(dy)
            backward = list(log)
    call = next(iter(module._eager_calls.values()))
    known = {}
    for tensor, name in ((x, "x"), (dy, "dy"), (y, "y"), (x.grad, "dx"), (module.weight, "w"),
                         (module.bias, "b"), (module.weight.grad, "dw"), (module.bias.grad, "db"),
                         (module.running_mean, "rm"), (module.running_var, "rv"),
                         (module.num_batches_tracked, "counter")):
        if tensor is not None:
            known[tensor.data_ptr()] = name
    # Other pointers are named in order of appearance, afresh in each pass: memory a pass frees
    # may come back to the next one, as the two paths free and allocate in different orders.
    passes = []
    for launches in (forward, backward):
        names = dict(known)
        passes.append([named(args, names) for args in launches])
    return passes, call.glue is not None

results = []
for case in json.loads(sys.argv[2]):
    python_log, _ = run(case, False)
    glue_log, glued = run(case, True)
    results.append({"case": case, "python": python_log, "glue": glue_log, "glued": glued})
print(json.dumps(results))
"""

CASES = [
    # (shape, module, training, activation, (needs dx, dγ, dβ))
    ((64, 16, 8, 8), "BatchNorm2d", True, None, (True, True, True)),  # fused-small
    ((64, 3, 40, 40), "BatchNorm2d", True, "relu", (True, True, True)),  # split-welford
    ((256, 120), "BatchNorm1d", True, "sigmoid", (True, False, True)),
    ((64, 16, 8, 8), "BatchNorm2d", False, None, (True, True, True)),  # eval
    ((64, 3, 40, 40), "BatchNorm2d", False, "silu", (False, True, True)),
]


@needs_standin
def test_the_glue_launches_what_the_python_path_launches(tmp_path):
    standin_cuda = _standin()
    folder = standin_cuda.build(tmp_path / "standin")
    result = subprocess.run(
        [sys.executable, "-c", SAME_LAUNCHES, str(BENCH), json.dumps(CASES)],
        env=standin_cuda.environment(folder),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for found in json.loads(result.stdout.splitlines()[-1]):
        assert found["glued"], f"{found['case']}: no glue attached"
        assert all(found["python"]), f"{found['case']}: a pass launched nothing"
        assert found["glue"] == found["python"], found["case"]


def _standin():
    """bench/standin_cuda.py (the bench folder is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import standin_cuda

    return standin_cuda


def test_glue_off_and_status(monkeypatch):
    monkeypatch.setenv(glue.ENV, "off")
    assert not glue.enabled()
    assert glue.extension() is None
    assert glue.status().startswith("off")
    monkeypatch.setenv(glue.ENV, "auto")
    assert glue.enabled()


BUILD_FAILS = r"""
import os, sys
from tritonbn import glue
os.environ["CXX"] = sys.argv[2]
os.environ["XDG_CACHE_HOME"] = sys.argv[1]
assert glue.extension() is None
assert glue.extension() is None  # the failure is remembered, not retried
print(glue.status())
"""


@pytest.mark.parametrize("why", ["no compiler", "cache not writable"])
def test_a_failed_build_leaves_the_python_function(tmp_path, why):
    cache = tmp_path / "cache"
    compiler = sys.executable + "-no-such-compiler"
    if why == "cache not writable":
        cache.write_text("a file where the cache folder should be")
        compiler = shutil.which("c++") or compiler
    result = subprocess.run(
        [sys.executable, "-c", BUILD_FAILS, str(cache), compiler],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRITONBN_GLUE": "auto"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("Python autograd Function (cannot build or load the C++ glue"), (
        result.stdout
    )
    assert not list(tmp_path.rglob("*.so"))
