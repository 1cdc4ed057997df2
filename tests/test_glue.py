"""The C++ glue of the eager path (tritonbn/glue.py, csrc/eager_glue.cpp, kernels/replay.py).

Its replays need compiled kernels, so these tests run Triton's real launch path under the
stand-in CUDA driver (bench/standin_cuda.py), where nothing executes: what they prove is that
the glue (through the driver itself, or through Triton's launch function) and the launch records
that call Triton's C launch functions directly launch exactly what the compiled launchers of the
Python path launch — the same kernels, grids, blocks, streams and parameter bytes, each pointer
the same tensor's — step after step, forward and backward, for every plan and mode, as the
gradients asked for change, and with a create_graph backward. On a GPU the whole suite runs over
the glue as well.
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

# Runs a few steps of one module through each route — the Python path launching through Triton's
# compiled launchers, the Python path calling their C launch functions directly (launch._direct),
# the glue, which launches through the driver itself (replay._driver_launch), and the glue made to
# launch everything through Triton's launch function, its way for what it cannot launch itself —
# and logs every launch of the last step's forward and backward twice: where it reaches Triton's C
# launch function (arguments flattened), and where it reaches the driver (the stand-in's log:
# kernel, grid, block, shared memory, launch attributes, stream and each kernel parameter, sized by
# the kernel's PTX). Pointers are named by the tensor they point into.
SAME_LAUNCHES = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
import standin_cuda
standin_cuda.install()
import torch
import triton
from triton.backends.nvidia import driver as nvidia
from triton.compiler.compiler import CompiledKernel
triton.runtime.driver.active.get_current_stream = lambda device=None: 4242  # seen in the logs
import tritonbn
from tritonbn.kernels import backward, fused_small, launch, normalize, replay, stats

log = []
original_init = nvidia.CudaLauncher.__init__

def logged_launcher(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    c_launch = self.launch

    def logged(*args):
        log.append((*args[:-1], *args[-1]) if isinstance(args[-1], tuple) else args)
        return c_launch(*args)

    self.launch = logged

nvidia.CudaLauncher.__init__ = logged_launcher

class DriverLaunch(ctypes.Structure):  # bench/standin_cuda/standin_cuda.c's struct standin_launch
    _fields_ = [("function", ctypes.c_ulong), ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared", ctypes.c_uint), ("attributes", ctypes.c_uint), ("stream", ctypes.c_ulong),
                ("params", ctypes.c_uint), ("bytes", ctypes.c_uint), ("data", ctypes.c_ubyte * 512)]

driver = standin_cuda._library
driver.standin_logged_launch.restype = ctypes.POINTER(DriverLaunch)
sizes_of = {}  # kernel handle -> its parameters' sizes, told to the stand-in when the kernel loads
original_handles = CompiledKernel._init_handles

def handles_with_sizes(self):
    original_handles(self)
    sizes = launch.parameter_sizes(self)
    if self.function not in sizes_of and sizes is not None:
        sizes_of[self.function] = sizes
        told = driver.standin_param_sizes(self.function, (ctypes.c_uint * len(sizes))(*sizes), len(sizes))
        assert told == 0

CompiledKernel._init_handles = handles_with_sizes

def driver_log():
    entries = []
    for i in range(driver.standin_logged()):
        entry = driver.standin_logged_launch(i).contents
        data, at, params = bytes(entry.data[: entry.bytes]), 0, []
        for size in sizes_of.get(entry.function, [])[: entry.params]:
            params.append(int.from_bytes(data[at : at + size], "little"))
            at += size
        assert entry.params == len(params) > 0, "a kernel whose parameter sizes the stand-in was not told"
        entries.append([entry.function, *entry.grid, *entry.block, entry.shared, entry.attributes,
                        entry.stream, *params])
    driver.standin_log(1)
    return entries

checked = []  # the module calls that went through the checks
original_check = tritonbn.modules._TritonBatchNorm._check_input_dim
tritonbn.modules._TritonBatchNorm._check_input_dim = lambda *args: checked.append(1) or original_check(*args)
LAUNCHERS = [value for module in (backward, fused_small, normalize, stats) for value in vars(module).values()
             if isinstance(value, launch.Launcher)]

def named(args, names):
    out = []
    for value in args:
        if isinstance(value, torch.Tensor):
            value = value.data_ptr()
        if isinstance(value, int) and not isinstance(value, bool) and value > 1 << 20:
            value = names.setdefault(value, f"internal{len(names)}")
        out.append(value if isinstance(value, (int, float, str, type(None), bool)) else repr(type(value)))
    return out

driver_launch = replay._driver_launch

def run(case, route):
    os.environ["TRITONBN_GLUE"] = "auto" if route.startswith("glue") else "off"
    launch._DIRECT = route != "python through the compiled launchers"
    # The glue's other way to launch, Triton's launch function, which it keeps for what it cannot
    # launch itself: here for everything.
    replay._driver_launch = driver_launch if route == "glue" else (lambda record, arguments: None)
    for launcher in LAUNCHERS:  # records of the previous route go
        launcher.records.clear()
    del checked[:]
    shape, cls, training, activation, phases = case
    torch.manual_seed(0)
    module = getattr(tritonbn, cls)(shape[1], activation=activation)
    module.train(training)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    logged, at_driver = [], []
    for needs in phases:  # a few steps with each combination of gradients, the last one logged
        x.requires_grad_(needs != "create_graph" and needs[0])
        module.weight.requires_grad_(needs == "create_graph" or needs[1])
        module.bias.requires_grad_(needs == "create_graph" or needs[2])
        with tritonbn.backend("triton"):
            # Checked, recorded, then the glue's forward with the backward recorded, then the glue.
            for step in range(4):
                del log[:]
                driver_log()
                y = module(x)
                forward, forward_driver = list(log), driver_log()
                del log[:]
                if needs == "create_graph":  # a gradient penalty: the backward as torch ops
                    (dw,) = torch.autograd.grad(y, module.weight, dy, create_graph=True)
                    dw.square().sum().backward()
                else:
                    y.backward(dy)
                backward, backward_driver = list(log), driver_log()
        known = {}
        for tensor, name in ((x, "x"), (dy, "dy"), (y, "y"), (x.grad, "dx"), (module.weight, "w"),
                             (module.bias, "b"), (module.weight.grad, "dw"), (module.bias.grad, "db"),
                             (module.running_mean, "rm"), (module.running_var, "rv"),
                             (module.num_batches_tracked, "counter")):
            if tensor is not None:
                known[tensor.data_ptr()] = name
        # Other pointers are named in order of appearance, afresh in each pass: memory a pass
        # frees may come back to the next one, as the two paths free and allocate differently.
        for launches, driver_launches in ((forward, forward_driver), (backward, backward_driver)):
            names = dict(known)
            logged.append([named(args, names) for args in launches])
            names = dict(known)
            at_driver.append([named(entry, names) for entry in driver_launches])
    call = next(iter(module._eager_calls.values()))
    glued = call.glue is not None
    records = [record for launcher in LAUNCHERS for record in launcher.records.values()]
    direct = all(not isinstance(record.launch, nvidia.CudaLauncher) for record in records)
    module.bias = torch.nn.Parameter(module.bias.detach().clone())  # another tensor: checked again
    with tritonbn.backend("triton"):
        for step in range(2):
            module(x)
    return {"log": logged, "driver": at_driver, "glued": glued, "direct": bool(records) and direct,
            "checked": len(checked)}

ROUTES = ["python through the compiled launchers", "python", "glue", "glue through Triton's launch function"]
print(json.dumps([{"case": case, **{route: run(case, route) for route in ROUTES}}
                  for case in json.loads(sys.argv[2])]))
"""

ALL, INPUT_ONLY, PARAMETERS_ONLY = (True, True, True), (True, False, False), (False, True, True)
CASES = [
    # (shape, module, training, activation, phases: the gradients asked for, or a create_graph step)
    ((64, 16, 8, 8), "BatchNorm2d", True, None, [ALL, INPUT_ONLY, ALL, "create_graph"]),  # fused-small
    ((64, 3, 40, 40), "BatchNorm2d", True, "relu", [ALL, PARAMETERS_ONLY, "create_graph"]),  # split
    ((256, 120), "BatchNorm1d", True, "sigmoid", [(True, False, True)]),
    ((64, 16, 8, 8), "BatchNorm2d", False, None, [ALL, INPUT_ONLY]),  # eval
    ((64, 3, 40, 40), "BatchNorm2d", False, "silu", [PARAMETERS_ONLY, ALL]),
]


@needs_standin
def test_the_glue_launches_what_the_python_path_launches(tmp_path):
    for found in _under_standin(tmp_path, SAME_LAUNCHES, CASES, timeout=900):
        case, reference = found["case"], found["python through the compiled launchers"]
        glue, glue_through_triton = found["glue"], found["glue through Triton's launch function"]
        assert glue["glued"] and glue_through_triton["glued"], f"{case}: no glue attached"
        assert not reference["direct"] and found["python"]["direct"] and glue["direct"], case
        for phase, needs in enumerate(case[4]):
            forward, backward = reference["log"][2 * phase : 2 * phase + 2]
            assert forward, f"{case}: a forward launched nothing"
            # A create_graph backward runs as torch ops: no kernel at all.
            assert bool(backward) == (needs != "create_graph"), case
        assert found["python"]["log"] == reference["log"], case
        assert glue_through_triton["log"] == reference["log"], case
        # The glue launched every pass of the logged steps itself, through the driver...
        assert not any(glue["log"]), case
        # ... and the driver got the same launches from every route.
        assert [len(p) for p in reference["driver"]] == [len(p) for p in reference["log"]], case
        for route in (found["python"], glue, glue_through_triton):
            assert route["driver"] == reference["driver"], case
        # Checked once, and once again after the bias was reassigned: every other call was run
        # as remembered, the glue's included.
        assert [found[route]["checked"] for route in found if route != "case"] == [2, 2, 2, 2], case


# Steps of a remembered module whose glue call is attached, then steps while the stand-in says its
# stream is being captured into a CUDA graph (and so does torch, patched: tensors here are CPU
# tensors), then steps after the capture. Counts, per phase: the glue's launches (through the
# driver, through Triton's function), the Python path's launches and how many of their tensors
# were kept workspace, the programs recorded, and the calls that went through the checks.
CAPTURED = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import standin_cuda
standin_cuda.install()
import torch
import triton
triton.runtime.driver.active.get_current_stream = lambda device=None: 4242
import tritonbn
from tritonbn import glue
from tritonbn.kernels import launch, replay, workspace

counts = {"python launches": 0, "kept workspace": 0, "programs": 0, "checked": 0}
original_call = launch.Launcher.__call__

def counted_call(self, key, grid, args, meta):
    counts["python launches"] += 1
    counts["kept workspace"] += sum(isinstance(a, torch.Tensor) and workspace.is_workspace(a) for a in args)
    return original_call(self, key, grid, args, meta)

launch.Launcher.__call__ = counted_call
original_program = replay.program
replay.program = lambda *args, **kwargs: counts.update(programs=counts["programs"] + 1) or original_program(
    *args, **kwargs)
original_check = tritonbn.modules._TritonBatchNorm._check_input_dim
tritonbn.modules._TritonBatchNorm._check_input_dim = (
    lambda *args: counts.update(checked=counts["checked"] + 1) or original_check(*args))
captured = [False]
workspace.capturing = lambda device: captured[0]
driver = standin_cuda._library

def phase(module, x, dy, steps):
    before_glue, before = glue.launch_counts(), dict(counts)
    with tritonbn.backend("triton"):
        for _ in range(steps):
            module(x).backward(dy)
    after_glue = glue.launch_counts()
    return {**{key: counts[key] - before[key] for key in counts},
            **{f"glue {key}": after_glue[key] - before_glue[key] for key in after_glue}}

def capture(on):
    driver.standin_capture(4242, int(on))
    captured[0] = on

def glued(module):
    return [call.glue is not None for call in module._eager_calls.values()]

result = []
for shape in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    x, dy = torch.randn(shape, requires_grad=True), torch.randn(shape)
    module = tritonbn.BatchNorm2d(shape[1])
    phases = {"eager": phase(module, x, dy, 3)}
    capture(True)
    phases["captured"] = phase(module, x, dy, 2)
    capture(False)
    phases["after"] = phase(module, x, dy, 2)
    # A module first called while captured: nothing recorded then, the glue attached after.
    first = tritonbn.BatchNorm2d(shape[1])
    capture(True)
    phases["first captured"] = phase(first, x, dy, 3)
    phases["glued while captured"] = glued(first)
    capture(False)
    phases["first after"] = phase(first, x, dy, 3)
    result.append({"shape": shape, "glued": glued(module), "first glued": glued(first), **phases})
print(json.dumps(result))
"""


@needs_standin
def test_a_captured_call_leaves_the_glue_to_the_python_path(tmp_path):
    # The glue's programs launch with the workspace kept for eager calls, which a CUDA graph must not
    # share: a call captured into one runs the Python passes (the graph's own workspace), records
    # nothing, and the glue takes the calls after the capture again.
    shapes = [[64, 3, 40, 40], [64, 16, 8, 8]]  # split (workspace), fused-small (none)
    results = _under_standin(tmp_path, CAPTURED, shapes, glue="auto")
    for found in results:
        eager, captured, after = found["eager"], found["captured"], found["after"]
        assert found["glued"] == found["first glued"] == [True], found
        assert eager["checked"] == 1 and eager["programs"] >= 2 and eager["glue driver"] > 0, found
        # Captured: every launch from Python, none with kept workspace, nothing recorded or checked.
        assert captured["glue driver"] == captured["glue triton"] == 0, found
        assert captured["python launches"] > 0 and captured["kept workspace"] == 0, found
        assert captured["programs"] == captured["checked"] == 0, found
        # After: the glue's programs again, all of them through the driver.
        assert after["python launches"] == after["glue triton"] == after["programs"] == after["checked"] == 0
        assert after["glue driver"] > 0, found
        first_captured, first_after = found["first captured"], found["first after"]
        assert found["glued while captured"] == [False], found
        assert first_captured["glue driver"] == first_captured["glue triton"] == 0, found
        assert first_captured["programs"] == first_captured["kept workspace"] == 0, found
        assert first_captured["checked"] == 1 and first_after["checked"] == 0, found
        assert first_after["programs"] >= 2 and first_after["glue driver"] > 0, found
    split = results[0]
    assert split["eager"]["kept workspace"] > 0, "the split plan's first steps used no kept workspace"


# Backwards of a remembered channels_last module whose glue call is attached, without and then with
# a saved-tensor hook that hands the saved input back contiguous (as save_on_cpu(pin_memory=True)
# does). Counts, per backward: the glue's launches through the driver, and the Python path's
# launches and how many of them were given the unpacked (contiguous) input itself.
RELAID = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import standin_cuda
standin_cuda.install()
import torch
import triton
triton.runtime.driver.active.get_current_stream = lambda device=None: 4242
import tritonbn
from tritonbn import glue
from tritonbn.kernels import launch

unpacked = []
counts = {"python launches": 0, "given the unpacked input": 0}
original_call = launch.Launcher.__call__

def counted_call(self, key, grid, args, meta):
    counts["python launches"] += 1
    pointers = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
    counts["given the unpacked input"] += any(p.data_ptr() in pointers for p in unpacked)
    return original_call(self, key, grid, args, meta)

launch.Launcher.__call__ = counted_call

def unpack(tensor):
    tensor = tensor.contiguous()
    if tensor.dim() == 4:  # the input (the others saved are vectors, contiguous already)
        unpacked.append(tensor)
    return tensor

def backward(module, x, dy, hooked):
    with tritonbn.backend("triton"):
        if hooked:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
                y = module(x)
        else:
            y = module(x)
        before_glue, before = glue.launch_counts(), dict(counts)
        y.backward(dy)
    return {"glue driver": glue.launch_counts()["driver"] - before_glue["driver"],
            **{key: counts[key] - before[key] for key in counts}}

result = []
for shape in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    module = tritonbn.BatchNorm2d(shape[1])
    for _ in range(3):  # checked, recorded, then the glue with its backward recorded
        backward(module, x, dy, hooked=False)
    plain, hooked = backward(module, x, dy, hooked=False), backward(module, x, dy, hooked=True)
    result.append({"plain": plain, "hooked": hooked,
                   "glued": [call.glue is not None for call in module._eager_calls.values()]})
print(json.dumps(result))
"""


@needs_standin
def test_a_saved_input_given_back_in_another_layout_leaves_the_glue_to_the_python_path(tmp_path):
    # The glue's backward programs address the saved input with the forward's strides; one handed
    # back contiguous goes to the Python pass, which launches on a copy laid out as recorded.
    shapes = [[64, 16, 8, 8], [64, 3, 40, 40]]  # fused-small, split
    for found in _under_standin(tmp_path, RELAID, shapes, glue="auto"):
        plain, hooked = found["plain"], found["hooked"]
        assert found["glued"] == [True], found
        assert plain["glue driver"] > 0 and plain["python launches"] == 0, found
        assert hooked["glue driver"] == 0 and hooked["python launches"] > 0, found
        assert hooked["given the unpacked input"] == 0, found


def _under_standin(
    tmp_path: Path, script: str, argument: object, *, glue: str | None = None, timeout: int = 600
) -> list:
    """Run ``script`` in a process on the stand-in CUDA driver (built under ``tmp_path``), with
    the bench folder and ``argument`` (as JSON) as its arguments and ``TRITONBN_GLUE`` set to
    ``glue`` (unless None); the JSON list its last line prints."""
    standin_cuda = _standin()
    env = standin_cuda.environment(standin_cuda.build(tmp_path / "standin"))
    if glue is not None:
        env["TRITONBN_GLUE"] = glue
    result = subprocess.run(
        [sys.executable, "-c", script, str(BENCH), json.dumps(argument)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


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
