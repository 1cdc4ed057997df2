"""bench/host_overhead.py runs, once, as a check: on a machine without CUDA it goes through
Triton's real launch path under the stand-in driver, and the launches it counts are the ones each
plan promises (KERNEL_PLANS). The timings themselves are the script's business, not a test's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonbn.kernels.plans import KERNEL_PLANS

SCRIPT = Path(__file__).with_name("host_overhead.py")


@pytest.mark.skipif(
    shutil.which("gcc") is None and not torch.cuda.is_available(),
    reason="the stand-in CUDA driver is built with gcc",
)
def test_host_overhead_runs_and_counts_each_plans_launches(tmp_path):
    out = tmp_path / "host.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "1", "--steps", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(out.read_text())
    layers = results["layers"]
    if results["eager_path"].startswith("C++"):  # the glue made launches, through the driver itself
        assert results["glue_launches"]["driver"] > 0, results["glue_launches"]
    assert [row["layer"] for row in layers] == [
        "conv1 (256,6,24,24)",
        "conv2 (256,16,8,8)",
        "conv2 channels_last",
        "fc1 (256,120)",
        "fc2 (256,84)",
        "conv1 + sigmoid",
        "conv2 + sigmoid",
        "fc1 + sigmoid",
        "fc2 + sigmoid",
    ]
    for row in layers:
        plan = KERNEL_PLANS[row["plan"]]
        assert (row["launches_forward"], row["launches_backward"]) == (
            plan.forward_launches,
            plan.backward_launches,
        ), row
        assert row["tritonbn_us"] > 0 and row["torch_us"] > 0
    assert {row["plan"] for row in layers} == {"split-welford", "fused-small"}


@pytest.mark.skipif(
    shutil.which("gcc") is None and not torch.cuda.is_available(),
    reason="the stand-in CUDA driver is built with gcc",
)
def test_compiled_timing_of_chosen_layers(tmp_path):
    # --compiled times the chain through torch.compile too; --layers keeps the run to one layer.
    out = tmp_path / "host.json"
    layer = "fc1 (256,120)"
    command = [sys.executable, str(SCRIPT), "--repeats", "1", "--steps", "2", "--compiled", "--layers", layer]
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = json.loads(out.read_text())["layers"]
    assert row["layer"] == layer and row["tritonbn_compiled_us"] > 0
    assert ("torch_compiled_us" in row) == torch.cuda.is_available()
    assert "| tritonbn compiled µs |" in result.stdout
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--layers", "fc9"], capture_output=True, text=True, timeout=600
    )
    assert refused.returncode == 2 and "--layers: unknown ['fc9']" in refused.stderr


LAUNCH_SITES = """
import sys
sys.path.insert(0, {bench!r})
import standin_cuda
standin_cuda.install()
import torch
from tritonbn import kernels
from tritonbn.kernels.launch import launch_counts

x = torch.randn(64, 3, 33, 33)
def forward(sm_count):
    kernels.forward_train(x, None, None, None, None, 0.1, 1e-5, plan="split-welford", sm_count=sm_count)
    return launch_counts()
first = forward(132)
again = forward(132)
other = forward(4)
print(first["jit"], again["jit"], again["record"], other["jit"])
"""


@pytest.mark.skipif(
    shutil.which("gcc") is None or torch.cuda.is_available(),
    reason="the stand-in CUDA driver is built with gcc, and only without CUDA",
)
def test_launch_records_are_reused_only_for_the_same_launch_site(tmp_path):
    # Under the stand-in driver the real launch path runs: the first call of a launch site goes
    # through Triton's JIT (2 launches), the same call again through its records; another SM count
    # changes the split, so it is another site (the JIT again), never a replay of the old grid.
    import standin_cuda

    folder = standin_cuda.build(tmp_path / "standin")
    script = LAUNCH_SITES.format(bench=str(SCRIPT.parent))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=standin_cuda.environment(folder),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["2", "2", "2", "4"], result.stdout
