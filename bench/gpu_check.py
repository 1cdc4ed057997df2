"""One command for a GPU machine: check versions, test, sanitize, time, tune and train tritonbn.

    python bench/gpu_check.py OUTDIR [--data-dir DIR] [--quick] [--dry-run]

Run from anywhere on a checkout; needs no network. The data travels with the checkout: before the
device call, ``mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
data/fashion-mnist/`` here (``data/`` is gitignored, so name it in the call's ``carry``). Each
step has a time budget; a step that fails or runs out of time is recorded and the next one runs,
all inside about eight minutes (a step out of time is interrupted as by Ctrl-C first, so pytest
still prints its summary and the trainer keeps its finished epochs):

1. versions and device: python, torch, triton, torchvision, driver, GPU, SMs, a copy bandwidth;
   a warning when torch and Triton are not a pair CI tests (``noxfile.py``'s VERSION_PAIRS);
2. ``pip install --no-deps --no-build-isolation -e .`` (the machine's torch and triton stay);
   then ``python -m tritonbn.glue``, which compiles the eager path's C++ glue for this torch
   (the later steps use it; where it cannot be built they run the Python Function);
3. ``pytest -q --maxfail=10`` over ``tests`` on CUDA, dealt over TEST_SHARDS processes (each
   compiles its kernels one at a time), the files only a GPU can settle first (the kernels, CUDA
   graphs, fused activations and residuals, whole models), its output in OUTDIR/tests.log (the
   tests that run the kernels on CPU tensors need the interpreter and are skipped, as
   ``tests/conftest.py`` says: CI runs them); where tests failed, those again with
   ``TRITONBN_GLUE=off``, which tells whether the C++ glue causes them;
4. ``compute-sanitizer --tool memcheck`` over a small selection of kernel tests (every plan,
   ragged shapes, the int64 path), recorded as unavailable where the tool is missing;
5. the host time per layer (``bench/host_overhead.py``), wall clock on the GPU;
6. the benchmark suites (``pytest bench --benchmark-json``);
7. the tuner's sweep (``tritonbn.tune``, where installed) into OUTDIR/tuning-table.json;
8. the seed's LeNet training, 5 epochs, with ``--bn tritonbn``, ``--bn torch`` and
   ``--bn tritonbn --compile`` (Fashion-MNIST from --data-dir) into OUTDIR/train-*/metrics.json.

OUTDIR then holds results.json (bench/results/README.md describes it; copy it to
bench/results/<gpu>-<date>.json and run bench/render_benchmarks.py), summary.md, tests.log,
run.log (the other steps' output), tuning-table.json and three training metrics.json: eight
files, the most a device call brings back. ``--quick`` trains one epoch and times only float32
forward+backward. ``--dry-run`` rehearses every step on a machine without a GPU: the CPU, a few
tests, the host-overhead benchmark under the stand-in CUDA driver, one training epoch.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import host_overhead
import report

ROOT = Path(__file__).resolve().parent.parent
# Seconds for the whole check, and the most each step may take (normal, --quick). The benchmarks
# get what is left before the deadline, less the time kept to collect, write and report.
DEADLINE = 480
BUDGETS = {
    "install": (60, 60),
    # One C++ file against torch's headers.
    "glue": (60, 60),
    # The suite on a cold Triton cache, dealt over TEST_SHARDS processes (see there).
    "tests": (180, 120),
    # Only when tests failed: those again with TRITONBN_GLUE=off.
    "tests without glue": (40, 30),
    "sanitizer": (40, 30),
    "host": (30, 25),
    "tune": (45, 30),
    "train": (30, 25),
    "train-compile": (60, 60),
}
BENCH_RESERVE = 10
BENCH_WIND_DOWN = 40
MIN_STEP = 20
# Seconds to wait for the last output of a step once its process has ended.
COPY_GRACE = 10
# Seconds a step out of time has, once interrupted, to write what it has (pytest its summary of the
# tests that ran, the trainer its last epoch's metrics) before it is killed.
INTERRUPT_GRACE = 15
# (folder name, trainer arguments) of the LeNet runs.
TRAININGS = {
    "tritonbn": ["--bn", "tritonbn"],
    "torch": ["--bn", "torch"],
    "tritonbn-compile": ["--bn", "tritonbn", "--compile"],
}
KEPT_TRAIN_FILES = ("metrics.json",)
# The CUDA suite's files that run first, the ones only a GPU can settle: should the suite outrun
# its budget, the files it did not reach are the others (tests_in_order).
FIRST_TESTS = (
    "tests/test_kernels.py",
    "tests/test_cuda_graphs.py",
    "tests/test_activation.py",
    "tests/test_fusions.py",
    "tests/test_models.py",
)
# Processes the CUDA suite is dealt over. Each compiles its kernels one at a time, and the suite
# compiles about a thousand kernel variants on a cold Triton cache: bench/suite_compiles.py (its
# files that launch kernels in-process, under the stand-in driver) counts at least 866, compiled
# in 127-136 s of a 190-200 s run on the 2-core dev box. The GPU machine has 16 cores.
TEST_SHARDS = 8
# Files whose module-scoped fixtures are costly (training runs, process groups of 2 and 3 ranks):
# each goes whole to one process, which then runs those fixtures once.
WHOLE_FILES = ("tests/test_sync_batchnorm.py", "tests/test_train.py")
# Kernel tests run under compute-sanitizer: every plan, ragged shapes, the int64 path.
SANITIZED_TESTS = ["tests/test_kernels.py", "-k", "matches_reference or int64_offsets_forced"]


def _copy_lines(source, sinks) -> None:
    for line in iter(source.readline, ""):
        for sink in sinks:
            sink.write(line)
            sink.flush()


def _environment(settings: dict[str, str] | None) -> dict[str, str]:
    """This process's environment less every ``TRITONBN_*`` variable, plus ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRITONBN_")}
    return {**env, **(settings or {}), "PYTHONUNBUFFERED": "1"}


def _finish(processes: list[subprocess.Popen], deadline: float) -> bool:
    """Wait for ``processes`` until the monotonic ``deadline``; interrupt those still running then
    (SIGINT, as Ctrl-C: see INTERRUPT_GRACE) and kill those that outlive the grace. Returns
    whether any had to be interrupted."""
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            break
    late = [process for process in processes if process.poll() is None]
    for process in late:
        os.killpg(process.pid, signal.SIGINT)
    grace = time.monotonic() + INTERRUPT_GRACE
    for process in late:
        try:
            process.wait(timeout=max(grace - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return bool(late)


def run_step(
    name: str, command: list[str], budget: float, log: Path, settings: dict[str, str] | None = None
) -> dict[str, object]:
    """Run ``command`` in the checkout for at most ``budget`` seconds, its output appended to
    ``log`` and echoed here, with no ``TRITONBN_*`` variable but ``settings``; a command out of
    time is interrupted (SIGINT), then killed if it has not ended ``INTERRUPT_GRACE`` seconds
    later. Returns the step's record: command, status, return code, seconds."""
    shown = shlex.join(command)
    if settings:
        shown = " ".join(f"{key}={shlex.quote(value)}" for key, value in settings.items()) + " " + shown
    record: dict[str, object] = {"name": name, "command": shown, "budget_s": round(budget)}
    if budget < MIN_STEP:
        return {**record, "status": "skipped: out of time", "returncode": None, "seconds": 0.0}
    print(f"\n== {name}: {record['command']} (budget {budget:.0f} s)", flush=True)
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n== {name}: {record['command']}\n")
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_environment(settings),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        copier = threading.Thread(target=_copy_lines, args=(process.stdout, (sink, sys.stdout)))
        copier.start()
        if _finish([process], started + budget):
            status = f"timed out after {budget:.0f} s"
        else:
            status = "ok" if process.returncode == 0 else f"failed (exit status {process.returncode})"
        returncode = process.returncode
        copier.join(timeout=COPY_GRACE)
        sink.write(f"== {name}: {status}\n")
    seconds = time.monotonic() - started
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {**record, "status": status, "returncode": returncode, "seconds": round(seconds, 1)}


def collect_tests(pytest: list[str], files: list[str]) -> list[str] | None:
    """The node ids pytest collects from ``files``, in its order; None where collection fails."""
    try:
        result = subprocess.run(
            [*(arg for arg in pytest if arg != "-q"), "--collect-only", "-q", *files],
            cwd=ROOT,
            env=_environment(None),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return None
    ids: list[str] = []
    for line in result.stdout.splitlines():  # the ids, then a blank line and "N tests collected"
        if not line.strip():
            break
        ids.append(line.strip())
    collected = re.search(r"^(\d+) tests? collected", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not ids or collected is None or int(collected.group(1)) != len(ids):
        return None
    return ids


def deal(ids: list[str], count: int) -> list[list[str]]:
    """``ids`` dealt in order over at most ``count`` shards, one at a time, the tests of each of
    WHOLE_FILES together as one (where it first comes)."""
    units: list[list[str]] = []
    whole: dict[str, list[str]] = {}
    for node in ids:
        path = node.split("::", 1)[0]
        if path in WHOLE_FILES:
            if path not in whole:
                whole[path] = []
                units.append(whole[path])
            whole[path].append(node)
        else:
            units.append([node])
    shards: list[list[str]] = [[] for _ in range(count)]
    for number, unit in enumerate(units):
        shards[number % count].extend(unit)
    return [shard for shard in shards if shard]


def run_test_shards(name: str, pytest: list[str], shards: list[list[str]], budget: float, log: Path) -> dict:
    """Run ``pytest`` over each shard's node ids at once, for at most ``budget`` seconds, like
    :func:`run_step`; each one's output is appended to ``log`` when all have ended, and its last
    line echoed here. Returns the step's record, with the counts of its tests (:func:`count_outcomes`)."""
    record: dict[str, object] = {
        "name": name,
        "command": f"{shlex.join(pytest)} <node ids> in {len(shards)} process"
        + ("es" if len(shards) > 1 else ""),
        "budget_s": round(budget),
    }
    if budget < MIN_STEP:
        return {**record, "status": "skipped: out of time", "returncode": None, "seconds": 0.0}
    print(f"\n== {name}: {record['command']} (budget {budget:.0f} s)", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        outputs = [Path(scratch) / f"shard-{number}.log" for number in range(len(shards))]
        processes = []
        for shard, output in zip(shards, outputs, strict=True):
            with output.open("w") as sink:
                processes.append(
                    subprocess.Popen(
                        [*pytest, *shard],
                        cwd=ROOT,
                        env=_environment(None),
                        text=True,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        timed_out = _finish(processes, started + budget)
        with log.open("a") as sink:
            for number, (process, output) in enumerate(zip(processes, outputs, strict=True)):
                text = output.read_text(errors="replace")
                sink.write(
                    f"\n== {name}, process {number + 1} of {len(shards)}: exit status {process.returncode}\n"
                )
                sink.write(text)
                last = text.strip().splitlines()[-1] if text.strip() else "(no output)"
                print(f"   process {number + 1}: {last}", flush=True)
    codes = [process.returncode for process in processes]
    if timed_out:
        status = f"timed out after {budget:.0f} s"
    else:
        status = "ok" if not any(codes) else f"failed (exit statuses {codes})"
    seconds = time.monotonic() - started
    with log.open("a") as sink:
        sink.write(f"== {name}: {status}\n")
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    returncode = next((code for code in codes if code), 0)
    return {
        **record,
        "status": status,
        "returncode": returncode,
        "seconds": round(seconds, 1),
        "counts": count_outcomes(log),
    }


_OUTCOMES = {
    "passed",
    "failed",
    "skipped",
    "deselected",
    "xfailed",
    "xpassed",
    "error",
    "errors",
    "warning",
    "warnings",
}


def count_outcomes(log: Path) -> dict[str, int]:
    """Tests passed, failed, skipped and in error, summed over the closing lines of every pytest
    run in ``log`` (``1 failed, 2 passed, 3 skipped in 4.5s``)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        line = line.strip("= ")
        if " in " not in line or not line[:1].isdigit():
            continue
        parts = [part.split() for part in line.rsplit(" in ", 1)[0].split(", ")]
        if not all(len(part) == 2 and part[0].isdigit() and part[1] in _OUTCOMES for part in parts):
            continue
        for number, outcome in parts:
            outcome = "error" if outcome == "errors" else outcome
            if outcome in counts:
                counts[outcome] += int(number)
    return counts


def failed_tests(log: Path) -> list[str]:
    """The node ids of the tests that failed or errored in a pytest log (its short summary)."""
    found = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        for prefix in ("FAILED ", "ERROR "):
            if line.startswith(prefix):
                node = line[len(prefix) :].split(" - ", 1)[0].strip()
                if "::" in node and node not in found:
                    found.append(node)
    return found


def tests_in_order() -> list[str]:
    """Every test file of the suite, FIRST_TESTS first, the others in pytest's own order."""
    every = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py"))
    return [name for name in FIRST_TESTS if name in every] + [
        name for name in every if name not in FIRST_TESTS
    ]


def training_summary(step: dict[str, object], run_dir: Path) -> dict[str, object]:
    """Final metrics and epoch times of one training run, from its metrics.json; drops every file
    but the results (the checkpoint, a temporary file left by a killed run), keeping OUTDIR within
    its file limit."""
    for path in run_dir.glob("*") if run_dir.is_dir() else ():
        if path.name not in KEPT_TRAIN_FILES:
            path.unlink()
    summary: dict[str, object] = {"status": step["status"]}
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return summary
    record = json.loads(metrics.read_text())
    epochs = record.get("epochs", [])
    if epochs:
        times = [epoch["time_sec"] for epoch in epochs]
        summary.update(
            epochs=len(epochs),
            loss=epochs[-1]["loss"],
            train_acc=epochs[-1]["train_acc"],
            test_acc=epochs[-1]["test_acc"],
            first_epoch_sec=times[0],
            later_epoch_sec=statistics.median(times[1:]) if len(times) > 1 else None,
        )
    summary["dispatch"] = {
        layer: entry.get("train", {}).get("kernel") for layer, entry in record.get("dispatch", {}).items()
    }
    return summary


def fallback_machine_info() -> dict[str, object]:
    """machine_info for a run whose benchmarks wrote none: the device and versions, no bandwidth."""
    import torch
    from environment import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"tritonbn": environment(device)}


def tests_line(steps: list[dict]) -> str:
    """The CUDA suite's counts, and those of the failed tests rerun without the glue."""
    lines = []
    for step in steps:
        counts = step.get("counts")
        if counts is not None:
            told = ", ".join(
                f"{number} {'errors' if outcome == 'error' else outcome}"
                for outcome, number in counts.items()
            )
            lines.append(f"{step['name']}: {told} ({step['status']})")
    return "\n".join(lines) if lines else "not run"


def summary_markdown(results: dict) -> str:
    """OUTDIR/summary.md: the steps, the targets, the training runs and forward+backward float32."""
    info = report.machine(results)
    steps = report.markdown_table(
        ["step", "status", "seconds", "budget s"],
        [[s["name"], s["status"], f"{s['seconds']:.0f}", str(s["budget_s"])] for s in results["steps"]],
    )
    copy = info.get("copy_gbps")
    return (
        "\n\n".join(
            [
                f"# tritonbn GPU check, {results['datetime']}",
                f"{info.get('device_name')} (driver {info.get('driver')}, CUDA {info.get('cuda_runtime')}), "
                f"torch {info.get('torch')}, triton {info.get('triton')}; copy bandwidth "
                + (f"{copy:.0f} GB/s" if copy else "not measured")
                + (" (--quick)" if results["quick"] else ""),
                "## Steps\n\n" + steps,
                "## Tests\n\n" + tests_line(results["steps"]),
                "## Targets\n\n" + report.targets_table(report.targets(results)),
                "## Host time per layer\n\n"
                + (
                    host_overhead.report(results["host_overhead"])
                    if results["host_overhead"]
                    else "not measured"
                ),
                "## LeNet training\n\n" + report.training_table(results["training"]),
                "## forward+backward, float32\n\n" + report.headline_table(results["records"]),
            ]
        )
        + "\n"
    )


def _train_budget(name: str) -> str:
    """The BUDGETS key of training run ``name``: compiling takes its own time first."""
    return "train-compile" if "compile" in name else "train"


def source_layout(folder: Path) -> Path:
    """A folder that lays the checkout out as the installed package (``tritonbn`` with its
    ``kernels`` inside, as pyproject.toml maps them), by symbolic links: on PYTHONPATH it stands
    for an editable install."""
    package = folder / "tritonbn"
    shutil.rmtree(folder, ignore_errors=True)
    package.mkdir(parents=True)
    for entry in (ROOT / "tritonbn").iterdir():
        (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "kernels")
    return folder


def tested_pairs() -> dict[str, tuple[str, str, str]]:
    """noxfile.py's VERSION_PAIRS, read without importing nox (the GPU machine has none)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "VERSION_PAIRS" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise RuntimeError("noxfile.py has no VERSION_PAIRS")


def versions_step() -> dict[str, object]:
    """Step 1: what this machine runs, checked against the pairs CI tests, and printed first."""
    import torch

    from tritonbn.train import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = environment(device)
    release = {name: str(info.get(name) or "").split("+")[0] for name in ("torch", "triton")}
    tested = [
        pair
        for pair, (torch_v, triton_v, _) in tested_pairs().items()
        if (release["torch"], release["triton"]) == (torch_v, triton_v)
    ]
    info["tested_pair"] = tested[0] if tested else None
    if device.type == "cuda":
        buffer = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        target = torch.empty_like(buffer)
        target.copy_(buffer)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            target.copy_(buffer)
        stop.record()
        torch.cuda.synchronize()
        info["copy_gbps"] = 2 * buffer.numel() * 10 / (start.elapsed_time(stop) / 1e3) / 1e9
    lines = [f"{key}: {value}" for key, value in info.items()]
    print("== versions and device\n" + "\n".join(lines), flush=True)
    if not tested:
        print(
            f"warning: torch {release['torch']} with triton {release['triton']} is not a pair CI "
            f"tests ({tested_pairs()}): failures may be version trouble",
            flush=True,
        )
    status = "ok" if tested else "ok (untested version pair)"
    return {
        "name": "versions",
        "command": "",
        "budget_s": 0,
        "status": status,
        "returncode": 0,
        "seconds": 0.0,
        "environment": info,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every step, write OUTDIR's files and print the short tables; returns 0 when every step
    succeeded, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="new or empty folder for the results")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / "data" / "fashion-mnist",
        help="folder with the Fashion-MNIST .gz files (default: data/fashion-mnist)",
    )
    parser.add_argument("--quick", action="store_true", help="one training epoch, float32 forward+backward")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="rehearse every step without a GPU (CPU, few tests, stand-in driver)",
    )
    args = parser.parse_args(argv)
    outdir = args.outdir.resolve()
    if outdir.exists() and any(outdir.iterdir()):
        parser.error(f"{outdir} is not empty")
    outdir.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir.resolve()
    pick = 1 if args.quick or args.dry_run else 0
    device = "cpu" if args.dry_run else "cuda"
    started = time.monotonic()

    def left() -> float:
        return DEADLINE - (time.monotonic() - started)

    def budget(step: str) -> float:
        return min(BUDGETS[step][pick], left())

    log = outdir / "run.log"
    python = sys.executable
    steps = [versions_step()]
    install = run_step(
        "install",
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
        budget("install"),
        log,
    )
    if install["returncode"] != 0:
        # No network and a build backend too old for pyproject.toml (or none): run from the
        # checkout instead, through a folder that lays the package out as installed.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(
                None,
                [str(source_layout(outdir.parent / f".{outdir.name}-site")), os.environ.get("PYTHONPATH")],
            )
        )
        install["status"] += "; running from the checkout through PYTHONPATH instead"
    steps.append(install)
    steps.append(run_step("glue", [python, "-m", "tritonbn.glue"], budget("glue"), log))
    tests = ["tests/test_compat.py"] if args.dry_run else tests_in_order()
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    ids = collect_tests(pytest, tests)
    if ids is None:  # pytest will say why, once
        tests_step = run_step(
            "tests", [*pytest, "--maxfail=10", *tests], budget("tests"), outdir / "tests.log"
        )
        tests_step["counts"] = count_outcomes(outdir / "tests.log")
    else:
        shards = deal(ids, 1 if args.dry_run else TEST_SHARDS)
        tests_step = run_test_shards(
            "tests", [*pytest, "--maxfail=10"], shards, budget("tests"), outdir / "tests.log"
        )
    steps.append(tests_step)
    failed = failed_tests(outdir / "tests.log")
    if failed:  # the same tests on the Python autograd Function: does the C++ glue cause it?
        with tempfile.TemporaryDirectory() as scratch:
            rerun_log = Path(scratch) / "rerun.log"
            rerun = run_step(
                "failed tests without the glue",
                [*pytest, *failed],
                budget("tests without glue"),
                rerun_log,
                {"TRITONBN_GLUE": "off"},
            )
            rerun["counts"] = count_outcomes(rerun_log)
            with log.open("a") as sink:
                sink.write(rerun_log.read_text(errors="replace") if rerun_log.exists() else "")
        steps.append(rerun)
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None or args.dry_run:
        steps.append(
            {
                "name": "sanitizer",
                "command": "compute-sanitizer --tool memcheck",
                "budget_s": 0,
                "seconds": 0.0,
                "returncode": None,
                "status": "skipped: " + ("dry run" if args.dry_run else "compute-sanitizer not found"),
            }
        )
    else:
        steps.append(
            run_step(
                "sanitizer",
                [
                    sanitizer,
                    "--tool",
                    "memcheck",
                    "--error-exitcode",
                    "3",
                    python,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    *SANITIZED_TESTS,
                ],
                budget("sanitizer"),
                log,
            )
        )
    with tempfile.TemporaryDirectory() as scratch:
        host_json = Path(scratch) / "host.json"
        host_command = [python, "bench/host_overhead.py", "--json", str(host_json)]
        steps.append(
            run_step(
                "host overhead",
                host_command + (["--repeats", "3", "--steps", "10"] if pick else []),
                budget("host"),
                log,
            )
        )
        host = json.loads(host_json.read_text()) if host_json.is_file() else {}

        bench_json = Path(scratch) / "bench.json"
        later = budget("tune") + sum(budget(_train_budget(name)) for name in TRAININGS)
        bench_budget = left() - BENCH_RESERVE - later
        command = [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "bench",
            "--benchmark-quiet",
            f"--benchmark-json={bench_json}",
            f"--bench-budget={max(bench_budget - BENCH_WIND_DOWN, 1):.0f}",
        ]
        if args.dry_run:
            command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "--benchmark-disable"]
        steps.append(
            run_step("bench", command + (["--bench-quick"] if args.quick else []), bench_budget, log)
        )
        bench = json.loads(bench_json.read_text()) if bench_json.is_file() else {}

    tune_budget = budget("tune")
    table = outdir / "tuning-table.json"
    tune_command = [
        python,
        "-m",
        "tritonbn.tune",
        "--budget-s",
        f"{max(tune_budget - 15, 5):.0f}",
        "--out",
        str(table),
    ]
    if importlib.util.find_spec("tritonbn.tune") is None or args.dry_run:
        steps.append(
            {
                "name": "tune",
                "command": shlex.join(tune_command),
                "budget_s": 0,
                "seconds": 0.0,
                "returncode": None,
                "status": "skipped: "
                + ("dry run (needs CUDA)" if args.dry_run else "tritonbn.tune not installed"),
            }
        )
    else:
        steps.append(run_step("tune", tune_command, tune_budget, log))

    training: dict[str, dict[str, object]] = {}
    for name, options in TRAININGS.items():
        run_dir = outdir / f"train-{name}"
        command = [
            python,
            "-m",
            "tritonbn.train",
            *options,
            "--device",
            device,
            "--out",
            str(run_dir),
            "--quiet",
            "--data-dir",
            str(data_dir),
            *(["--epochs", "1"] if pick else []),
        ]
        if not data_dir.is_dir():
            step = {
                "name": f"train {name}",
                "command": shlex.join(command),
                "budget_s": 0,
                "seconds": 0.0,
                "status": f"skipped: no Fashion-MNIST folder {data_dir}",
                "returncode": None,
            }
        else:
            step = run_step(f"train {name}", command, budget(_train_budget(name)), log)
        steps.append(step)
        training[name] = training_summary(step, run_dir)

    results = report.with_records(
        {
            "schema": report.SCHEMA,
            "kind": "gpu-check" if not args.dry_run else "gpu-check-dry-run",
            "quick": args.quick,
            "datetime": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine_info": bench.get("machine_info") or fallback_machine_info(),
            "commit_info": bench.get("commit_info", {}),
            "environment": steps[0]["environment"],
            "steps": steps,
            "host_overhead": host,
            "training": training,
            "benchmarks": bench.get("benchmarks", []),
        }
    )
    (outdir / "results.json").write_text(
        json.dumps({k: v for k, v in results.items() if k != "records"}, indent=1) + "\n"
    )
    summary = summary_markdown(results)
    (outdir / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 0 if all(step["status"].startswith(("ok", "skipped")) for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
