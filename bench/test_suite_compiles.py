"""bench/suite_compiles.py runs, once, on a small selection: under the stand-in driver the kernels
compile for sm_90 and the script counts and times those compiles. The figures for the whole suite
are the script's business, not a test's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("suite_compiles.py")


@pytest.mark.skipif(
    shutil.which("gcc") is None or torch.cuda.is_available(),
    reason="the stand-in CUDA driver is built with gcc, and replaces no real one",
)
def test_the_compiles_of_a_selection_are_counted(tmp_path):
    # The split-welford and column-tiled steps of the ticket test, forward twice (train, eval) and
    # backward: statistics, normalize, gradient sums and dx kernels, in each tiling.
    out = tmp_path / "compiles.json"
    selection = ["tests/test_kernels.py", "-k", "tickets_are_reset"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *selection],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["compiles"] > 0 and 0 < figures["compile_s"] < figures["run_s"], figures
    # Each compile leaves its kernel in the fresh cache (which also holds Triton's launcher builds).
    assert figures["cache_entries"] >= figures["compiles"], figures
    assert result.stdout.startswith(f"{figures['compiles']} kernel variants compiled"), result.stdout
