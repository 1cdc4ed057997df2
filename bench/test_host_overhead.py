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
    layers = json.loads(out.read_text())["layers"]
    assert [row["layer"] for row in layers] == [
        "conv1 (256,6,24,24)",
        "conv2 (256,16,8,8)",
        "conv2 channels_last",
        "fc1 (256,120)",
        "fc2 (256,84)",
    ]
    for row in layers:
        plan = KERNEL_PLANS[row["plan"]]
        assert (row["launches_forward"], row["launches_backward"]) == (
            plan.forward_launches,
            plan.backward_launches,
        ), row
        assert row["tritonbn_us"] > 0 and row["torch_us"] > 0
    assert {row["plan"] for row in layers} == {"split-welford", "fused-small"}
