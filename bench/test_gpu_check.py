"""bench/gpu_check.py's own logic that a CPU can check: which tests to run again without the glue
when the CUDA suite fails (read from a real pytest log), and a step out of time still leaving
pytest's summary. The whole script is rehearsed with ``--dry-run``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # the bench folder is not a package: found through sys.path

ROOT = Path(gpu_check.__file__).resolve().parent.parent

SUITE = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("set-up fails")

def test_passes():
    pass

def test_fails():
    assert 1 == 2

@pytest.mark.parametrize("n", [1, 2])
def test_fails_once(n):
    assert n == 1

def test_errors(broken):
    pass
"""


def test_failed_tests_are_read_from_a_pytest_log(tmp_path):
    (tmp_path / "test_sample.py").write_text(SUITE)
    log = tmp_path / "tests.log"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sample.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 1
    assert gpu_check.failed_tests(log) == [
        "test_sample.py::test_fails",
        "test_sample.py::test_fails_once[2]",
        "test_sample.py::test_errors",
    ]
    # Run again from the same folder, those ids select exactly those tests.
    again = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *gpu_check.failed_tests(log)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2 failed, 1 error" in again.stdout, again.stdout
    assert gpu_check.failed_tests(tmp_path / "no such log") == []


SLOW_SUITE = """
import time

def test_fails():
    assert 1 == 2

def test_slow():
    time.sleep(120)
"""


def test_a_step_out_of_time_leaves_the_summary_of_the_tests_that_ran(tmp_path, monkeypatch):
    # Interrupted, not killed: pytest names the failures so far, which the glue-off rerun reads.
    monkeypatch.setattr(gpu_check, "MIN_STEP", 0)
    suite = tmp_path / "test_sample.py"
    suite.write_text(SLOW_SUITE)
    log = tmp_path / "tests.log"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        str(suite),
    ]
    step = gpu_check.run_step("tests", command, 8, log)
    assert step["status"] == "timed out after 8 s", step
    assert step["seconds"] < 8 + gpu_check.INTERRUPT_GRACE, step
    (failed,) = gpu_check.failed_tests(log)  # named from the checkout, where the step runs
    assert failed.endswith("test_sample.py::test_fails") and (ROOT / failed.split("::")[0]).samefile(suite)
    assert "1 failed" in log.read_text()


def test_the_cuda_suite_runs_every_test_file_once_the_gpu_only_ones_first():
    order = gpu_check.tests_in_order()
    every = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py"))
    assert sorted(order) == every
    assert order[: len(gpu_check.FIRST_TESTS)] == list(gpu_check.FIRST_TESTS)
