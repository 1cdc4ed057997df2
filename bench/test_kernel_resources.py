"""bench/kernel_resources.py runs, once, as a check: every LeNet layer with every activation, in
training and eval, compiles the kernels its plan promises (KERNEL_PLANS), each read from its cubin.
What the registers and spills are is the script's report, not a test's verdict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonbn.kernels.activation import ACTIVATIONS
from tritonbn.kernels.plans import KERNEL_PLANS

SCRIPT = Path(__file__).with_name("kernel_resources.py")


@pytest.mark.skipif(
    shutil.which("gcc") is None and not torch.cuda.is_available(),
    reason="the stand-in CUDA driver is built with gcc",
)
def test_kernel_resources_reads_every_kernel_each_plan_launches(tmp_path):
    out = tmp_path / "resources.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())["kernels"]
    calls: dict[tuple[str, object, str], list[dict]] = {}
    for row in rows:
        calls.setdefault((row["layer"], row["activation"], row["mode"]), []).append(row)
        assert row["registers"] > 0 and row["spill_bytes"] >= 0, row
    assert set(calls) == {
        (layer, activation, mode)
        for layer in ("conv1", "conv2", "fc1", "fc2")
        for activation in (None, *ACTIVATIONS)
        for mode in ("train", "eval")
    }
    for (_, _, mode), kernels in calls.items():
        plan = KERNEL_PLANS[kernels[0]["plan"]]
        launches = plan.forward_launches + plan.backward_launches if mode == "train" else 1
        # One compiled kernel a launch: the plans' launches are of distinct kernels.
        assert len(kernels) == launches, kernels
