"""bench/gpu_check.py's own logic that a CPU can check: which tests to run again without the glue
when the CUDA suite fails (read from a real pytest log), and a step out of time still leaving
pytest's summary. The whole script is rehearsed with ``--dry-run``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_step_out_of_time_leaves_the_summary_of_the_tests_that_ran(tmp_path, monkeypatch, processes):
    # Interrupted, not killed: pytest names the failures so far, which the glue-off rerun reads.
    monkeypatch.setattr(gpu_check, "MIN_STEP", 0)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # where the steps run
    (tmp_path / "test_sample.py").write_text(SLOW_SUITE)
    log = tmp_path / "tests.log"
    if processes == 1:
        step = gpu_check.run_step("tests", [*PYTEST, "test_sample.py"], 8, log)
    else:
        ids = gpu_check.collect_tests(PYTEST, ["test_sample.py"])
        step = gpu_check.run_test_shards("tests", PYTEST, gpu_check.deal(ids, processes), 8, log)
        assert step["counts"] == {"passed": 0, "failed": 1, "skipped": 0, "error": 0}, log.read_text()
    assert step["status"] == "timed out after 8 s", step
    assert step["seconds"] < 8 + gpu_check.INTERRUPT_GRACE, step
    assert gpu_check.failed_tests(log) == ["test_sample.py::test_fails"]
    assert "1 failed" in log.read_text()


def test_the_suite_dealt_over_processes_runs_each_test_once(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP", 0)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    (tmp_path / "test_sample.py").write_text(SUITE)
    ids = gpu_check.collect_tests(PYTEST, ["test_sample.py"])
    assert [node.split("::")[1] for node in ids] == [
        "test_passes",
        "test_fails",
        "test_fails_once[1]",
        "test_fails_once[2]",
        "test_errors",
    ]
    shards = gpu_check.deal(ids, 3)
    assert len(shards) == 3 and sorted(node for shard in shards for node in shard) == sorted(ids)
    log = tmp_path / "tests.log"
    step = gpu_check.run_test_shards("tests", PYTEST, shards, 60, log)
    assert step["status"] == "failed (exit statuses [1, 1, 0])", step
    assert step["counts"] == {"passed": 2, "failed": 2, "skipped": 0, "error": 1}, log.read_text()
    failed = gpu_check.failed_tests(log)
    assert sorted(failed) == [
        "test_sample.py::test_errors",
        "test_sample.py::test_fails",
        "test_sample.py::test_fails_once[2]",
    ]
    assert gpu_check.collect_tests(PYTEST, ["no_such_file.py"]) is None


def test_whole_files_go_to_one_process():
    ids = ["tests/test_a.py::one", "tests/test_train.py::x", "tests/test_a.py::two", "tests/test_train.py::y"]
    ids.append("tests/test_b.py::three")
    assert gpu_check.deal(ids, 2) == [
        ["tests/test_a.py::one", "tests/test_a.py::two"],
        ["tests/test_train.py::x", "tests/test_train.py::y", "tests/test_b.py::three"],
    ]
    assert gpu_check.deal(ids[:1], 4) == [ids[:1]]


def test_a_test_list_selects_by_id_function_or_file_and_names_what_it_misses(tmp_path):
    listing = tmp_path / "rerun.txt"
    listing.write_text(
        "# what the check did not reach\nt_a.py::one[2]\n\n"
        "t_a.py::two  # all its cases\nt_b.py\nt_a.py::gone[x]\n"
    )
    listed = gpu_check.listed_tests(listing)
    assert listed == ["t_a.py::one[2]", "t_a.py::two", "t_b.py", "t_a.py::gone[x]"]
    collected = [
        "t_a.py::one[1]",
        "t_a.py::one[2]",
        "t_a.py::two[1]",
        "t_a.py::two[2]",
        "t_b.py::x",
        "t_c.py::y",
    ]
    assert gpu_check.select_listed(collected, listed) == (
        ["t_a.py::one[2]", "t_a.py::two[1]", "t_a.py::two[2]", "t_b.py::x"],
        ["t_a.py::gone[x]"],
    )


def test_a_test_list_must_list_tests(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    for listing in (empty, tmp_path / "missing.txt"):
        with pytest.raises(SystemExit) as stop:
            gpu_check.main([str(tmp_path / "out"), "--tests-from", str(listing)])
        assert stop.value.code == 2
        assert f"--tests-from: expected a file listing tests, got {listing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outcomes_are_summed_over_the_closing_lines_of_a_log(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text(
        "..F\n== a step: 1 process\n"
        "=== 3 passed, 1 failed, 2 skipped, 4 warnings in 1.2s ===\n"
        "2 passed, 1 error, 7 deselected in 0:01:02\n"
        "no tests ran in 0.01s\n4 processes in 9 s\n"
    )
    assert gpu_check.count_outcomes(log) == {"passed": 5, "failed": 1, "skipped": 2, "error": 1}


def test_the_cuda_suite_runs_every_test_file_once_the_gpu_only_ones_first_compiles_last():
    order = gpu_check.tests_in_order()
    every = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py"))
    assert sorted(order) == every
    assert order[: len(gpu_check.FIRST_TESTS)] == list(gpu_check.FIRST_TESTS)
    assert order[-len(gpu_check.LAST_TESTS) :] == list(gpu_check.LAST_TESTS)


IGNORED_SIGINT_STEP = """
import signal, sys
sys.path.insert(0, {bench!r})
import gpu_check
from pathlib import Path
gpu_check.MIN_STEP = 0
gpu_check.ROOT = Path({folder!r})
if {restore}:
    gpu_check._interruptible()
step = gpu_check.run_step("tests", {pytest!r} + ["test_sample.py"], 8, Path({folder!r}) / "tests.log")
print(step["status"])
"""


def test_a_step_is_interrupted_even_where_the_check_started_with_sigint_ignored(tmp_path):
    # As a background job of a script or under nohup: an ignored SIGINT stays ignored in every
    # child, so a step out of time would be killed without writing its summary.
    (tmp_path / "test_sample.py").write_text(SLOW_SUITE)
    script = IGNORED_SIGINT_STEP.format(
        bench=str(ROOT / "bench"), folder=str(tmp_path), pytest=PYTEST, restore=True
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert result.returncode == 0, result.stderr
    assert "timed out after 8 s" in result.stdout
    assert "1 failed" in (tmp_path / "tests.log").read_text()


def test_the_check_itself_never_imports_tritonbn(tmp_path):
    # On the GPU machine tritonbn is installed by a child of the check, which the check's own
    # import system never sees: whatever the check runs in its own process must do without it.
    script = f"""
import json, sys
sys.modules["tritonbn"] = None  # any import of tritonbn now raises
sys.path.insert(0, {str(ROOT / "bench")!r})
import gpu_check
step = gpu_check.versions_step(sys.executable, "cpu", 120)
print(json.dumps(step))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    step = json.loads(result.stdout.strip().splitlines()[-1])
    assert step["status"].startswith("ok"), step
    assert step["environment"]["tritonbn"] and step["environment"]["torch"]


def test_only_names_the_steps_it_can_select(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(tmp_path / "out"), "--only", "bench,trainn"])
    assert stop.value.code == 2
    assert "unknown step(s) trainn" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_the_dry_runs_benchmarks_run_timed_and_record_their_cases(tmp_path):
    # The suite's own CI run disables the timing (--benchmark-disable): the timed path, which
    # the check takes, runs here on the dry run's selection, as its bench step runs it.
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *gpu_check.BENCH_SUITES,
            "--benchmark-quiet",
            f"--benchmark-json={out}",
            "-k",
            gpu_check.DRY_RUN_BENCH,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    timed = [bench for bench in json.loads(out.read_text())["benchmarks"] if bench["extra_info"].get("ms")]
    assert {bench["extra_info"]["backend"] for bench in timed} >= {"tritonbn", "torch"}
