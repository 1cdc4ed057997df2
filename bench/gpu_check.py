"""One command for a GPU machine: check versions, test, sanitize, time, tune and train tritonbn.

    python bench/gpu_check.py OUTDIR [--data-dir DIR] [--quick] [--only STEPS] [--dry-run]

Run from anywhere on a checkout; needs no network, and no tritonbn installed: this process never
imports it (the install below happens in a child, whose import paths this one never sees; the
dry run blocks the import to make sure). The data travels with the checkout: before the device
call, ``mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
data/fashion-mnist/`` here (``data/`` is gitignored, so name it in the call's ``carry``). Each
step has a time budget; a step that fails or runs out of time is recorded and the next one runs,
all inside DEADLINE (a step out of time is interrupted as by Ctrl-C first, so pytest still prints
its summary and the trainer keeps its finished epochs). OUTDIR's results.json and summary.md are
written again after every step, so a check cut short still leaves what it measured. In order, the
issue's figures first:

1. ``pip install --no-deps --no-build-isolation -e .`` (the machine's torch and triton stay);
2. versions and device: python, torch, triton, torchvision, driver, GPU, SMs, L2, a copy
   bandwidth; a warning when torch and Triton are not a pair CI tests (``noxfile.py``);
3. ``python -m tritonbn.glue``, which compiles the eager path's C++ glue for this torch (the later
   steps use it; where it cannot be built they run the Python Function);
4. ``pytest -q --maxfail=10`` over ``tests`` on CUDA, dealt over TEST_SHARDS processes (each
   compiles its kernels one at a time), the files only a GPU can settle first (the kernels, CUDA
   graphs, fused activations and residuals, whole models), torch.compile's last (LAST_TESTS),
   its output in OUTDIR/tests.log (the tests that run the kernels on CPU tensors need the
   interpreter and are skipped, as ``tests/conftest.py`` says: CI runs them); beside it, one more
   process runs the benchmark suites untimed (``--benchmark-disable``): their checks on this
   device, and the kernels they need compiled into Triton's cache before the timed run;
5. the benchmark suites, timed (``pytest bench/test_bench_*.py --benchmark-json``), in the tiers
   of ``bench/cases.py``: float32 forward+backward of tritonbn and torch first;
6. the seed's LeNet training, 5 epochs, ``--bn tritonbn`` then ``--bn torch`` (Fashion-MNIST from
   --data-dir) into OUTDIR/train-*/metrics.json;
7. where tests failed, those again with ``TRITONBN_GLUE=off``: does the C++ glue cause them?
8. the host time per layer (``bench/host_overhead.py``), wall clock on the GPU;
9. ``compute-sanitizer --tool memcheck`` over a small selection of kernel tests (every plan,
   ragged shapes, the int64 path, vector loads beside a misaligned input), recorded as
   unavailable where the tool is missing;
10. the LeNet training with ``--bn tritonbn --compile``, the trainer's fastest configuration;
11. the tuner's sweep (``tritonbn.tune``) into OUTDIR/tuning-table.json;
12. the host time per layer through ``torch.compile`` (default mode, no CUDA graphs), tritonbn's
    against torch's, on one layer of each plan (``bench/host_overhead.py --compiled``): what a
    compiled graph's host pays per BatchNorm call. Last, since a full check rarely leaves time for
    it: ``--only host-compiled`` runs it after one.

OUTDIR then holds results.json (bench/results/README.md describes it; copy it to
bench/results/<gpu>-<date>.json, run bench/render_benchmarks.py, and bench/tuning_from_results.py with
--tuned OUTDIR/tuning-table.json for the GPU's packaged tuning table), summary.md, tests.log,
run.log (the other steps' output), tuning-table.json and three training metrics.json: eight
files, the most a device call brings back. ``--quick`` trains one epoch and times only float32
forward+backward. ``--only train-compile,tune`` (any of STEP_NAMES) reruns some steps after a fix.
``--tests-from FILE`` runs the tests FILE lists instead of the whole suite (what a check did not
reach, say). ``--dry-run`` rehearses every step on a machine without a GPU: the CPU, a few tests, the
host-overhead benchmark under the stand-in CUDA driver, one training epoch.
"""

from __future__ import annotations

import argparse
import ast
import datetime
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
import traceback
from pathlib import Path

import host_overhead
import report

ROOT = Path(__file__).resolve().parent.parent
# Seconds for the whole check, and the most each step may take (normal, --quick). The device
# allowance is 15 minutes with the start-up (30 s on the H200, 2026-11-30): this leaves about six
# minutes for a rerun of some steps (--only). In the order they run; the last ones get what is left
# (the first full check, at 480 s, used 444: its tests ran out of time, its benchmarks failed early).
DEADLINE = 510
BUDGETS = {
    "install": (60, 60),
    "versions": (30, 30),
    # One C++ file against torch's headers.
    "glue": (60, 60),
    # The suite on a cold Triton cache, dealt over TEST_SHARDS processes (see there): on the H200
    # 120 s reached about 1,020 of its 1,740 tests.
    "tests": (150, 90),
    # Timed until the budget less BENCH_WIND_DOWN, then pytest-benchmark writes its JSON.
    "bench": (150, 75),
    "train": (30, 25),
    # Only when tests failed: those again with TRITONBN_GLUE=off.
    "tests without glue": (30, 20),
    "host": (25, 20),
    "sanitizer": (30, 20),
    "train-compile": (60, 60),
    "tune": (30, 20),
    # Four chains compiled (tritonbn's and torch's on two layers), then timed.
    "host-compiled": (60, 40),
}
BENCH_WIND_DOWN = 40
MIN_STEP = 20
# Seconds the benchmarks' untimed run may go on once the tests have ended, to finish rather than be
# interrupted in its last lines.
WARM_GRACE = 5
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
# The files that run last: on the H200 (2026-11-30) each test of test_compile.py took about 25 s on
# inductor's cold cache, and half the processes spent the suite's budget there; the trainer's
# --compile run covers compiling on CUDA end to end.
LAST_TESTS = ("tests/test_compile.py",)
# Processes the CUDA suite is dealt over. Each compiles its kernels one at a time, and the suite
# compiles over a thousand kernel variants on a cold Triton cache: bench/suite_compiles.py (its
# files that launch kernels in-process, under the stand-in driver) counts at least 1,203 (866
# before the tiles' alignment became a constexpr), compiled in 194 s of a 354 s run on the 2-core
# dev box, one process: about 100 a shard. The GPU machine has 16 cores: these and the
# benchmarks' untimed run beside them leave a few for the copying of output.
TEST_SHARDS = 12
# Files whose module-scoped fixtures are costly (training runs, process groups of 2 and 3 ranks):
# each goes whole to one process, which then runs those fixtures once.
WHOLE_FILES = ("tests/test_sync_batchnorm.py", "tests/test_train.py")
# Kernel tests run under compute-sanitizer: every plan, ragged shapes, the int64 path, and the
# vector loads and stores of aligned runs (half precision) beside an input one element off.
SANITIZED_TESTS = [
    "tests/test_kernels.py",
    "-k",
    "matches_reference or int64_offsets_forced or (aligned_runs and misaligned and float16)",
]


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
        # A daemon: a grandchild that keeps the pipe open (a compile worker) must not hold the
        # check at its exit once COPY_GRACE has passed.
        copier = threading.Thread(target=_copy_lines, args=(process.stdout, (sink, sys.stdout)), daemon=True)
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


def start_background(command: list[str], output: Path) -> subprocess.Popen:
    """Start ``command`` in the checkout, its output into ``output``, in a session of its own (so
    that :func:`_finish` can interrupt it and its children)."""
    with output.open("w") as sink:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=_environment(None),
            text=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


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
        processes = [
            start_background([*pytest, *shard], output) for shard, output in zip(shards, outputs, strict=True)
        ]
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


def listed_tests(path: Path) -> list[str]:
    """The node ids or files ``path`` lists, one a line (blank lines and ``#`` comments left out)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def select_listed(collected: list[str], listed: list[str]) -> tuple[list[str], list[str]]:
    """The ``collected`` node ids that ``listed`` names (an entry names itself, and a file or a test
    function also every test under it), in collection order; and the entries that name none."""
    selected: list[str] = []
    matched: set[str] = set()
    for node in collected:
        function = node.split("[", 1)[0]
        names = [entry for entry in (node, function, node.split("::", 1)[0]) if entry in listed]
        if names:
            selected.append(node)
            matched.update(names)
    return selected, [entry for entry in listed if entry not in matched]


def tests_in_order() -> list[str]:
    """Every test file of the suite, FIRST_TESTS first, LAST_TESTS last, the others in pytest's own
    order between them."""
    every = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py"))
    ends = (*FIRST_TESTS, *LAST_TESTS)
    return [
        *(name for name in FIRST_TESTS if name in every),
        *(name for name in every if name not in ends),
        *(name for name in LAST_TESTS if name in every),
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
                "## Host time per layer through torch.compile\n\n"
                + (
                    host_overhead.report(results["host_overhead_compiled"])
                    if results.get("host_overhead_compiled")
                    else "not measured"
                ),
                "## LeNet training\n\n" + report.training_table(results["training"]),
                "## forward+backward, float32\n\n" + report.headline_table(results["records"]),
            ]
        )
        + "\n"
    )


def _train_budget(name: str) -> str:
    """The BUDGETS key and the --only step of training run ``name``: compiling takes its own
    time first."""
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


# Run by the versions step in a child, once tritonbn is installed: the device, the versions and
# the copy bandwidth, as one line of JSON.
PROBE = """
import json, sys, torch
from tritonbn.train import environment
device = torch.device(sys.argv[1])
info = environment(device)
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
print(json.dumps(info))
"""


def versions_step(python: str, device: str, budget: float) -> dict[str, object]:
    """Step 2, right after the install: what this machine runs (``tritonbn.train.environment``, in
    a child: this process never imports tritonbn, which it could not see before the install),
    checked against the pairs CI tests, and printed. Where the child fails, the versions this
    process can read without tritonbn."""
    started = time.monotonic()
    try:
        probe = subprocess.run(
            [python, "-c", PROBE, device],
            cwd=ROOT,
            env=_environment(None),
            capture_output=True,
            text=True,
            timeout=max(budget, 1),
        )
        lines = probe.stdout.strip().splitlines()
        info = json.loads(lines[-1]) if probe.returncode == 0 and lines else None
        problem = None if info else (probe.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        info, problem = None, f"timed out after {budget:.0f} s"
    if info is None:
        import platform

        import torch

        info = {
            "device_type": device,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version_of("triton"),
            "torchvision": _version_of("torchvision"),
        }
    release = {name: str(info.get(name) or "").split("+")[0] for name in ("torch", "triton")}
    tested = [
        pair
        for pair, (torch_v, triton_v, _) in tested_pairs().items()
        if (release["torch"], release["triton"]) == (torch_v, triton_v)
    ]
    info["tested_pair"] = tested[0] if tested else None
    lines = [f"{key}: {value}" for key, value in info.items()]
    print("\n== versions and device\n" + "\n".join(lines), flush=True)
    if not tested:
        print(
            f"warning: torch {release['torch']} with triton {release['triton']} is not a pair CI "
            f"tests ({tested_pairs()}): failures may be version trouble",
            flush=True,
        )
    status = "ok" if tested else "ok (untested version pair)"
    if problem:
        status = f"failed: {problem}"
    return {
        "name": "versions",
        "command": f"{python} -c PROBE {device}",
        "budget_s": round(budget),
        "status": status,
        "returncode": 0 if problem is None else 1,
        "seconds": round(time.monotonic() - started, 1),
        "environment": info,
    }


def _version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _interruptible() -> None:
    """Make SIGINT interrupt this process and its steps even where it was started with SIGINT
    ignored (a background job of a script, nohup): an ignored signal stays ignored across exec, so
    a step out of time would not get the Ctrl-C that lets pytest and the trainer write what they
    have, and would be killed instead."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def skipped(name: str, command: str, why: str) -> dict[str, object]:
    """The record of a step that did not run."""
    return {
        "name": name,
        "command": command,
        "budget_s": 0,
        "seconds": 0.0,
        "returncode": None,
        "status": f"skipped: {why}",
    }


# The benchmark suites (bench/conftest.py orders their tests by tier across the files, and within a
# tier by this order: the fused-activation target before the BatchNorm suite's other passes); the
# other test files under bench/ check the scripts, not the device.
BENCH_SUITES = (
    "bench/test_bench_activation.py",
    "bench/test_bench_batchnorm.py",
    "bench/test_bench_fusions.py",
)
# What --only selects: "train" is the LeNet runs with --bn tritonbn and torch, "train-compile"
# the compiled one (the last steps of a full check are the likeliest to run out of time).
STEP_NAMES = ("tests", "bench", "train", "host", "sanitizer", "train-compile", "tune", "host-compiled")
# The layers the host-compiled step times: one of each plan LeNet runs (split-welford, fused-small).
COMPILED_HOST_LAYERS = ("conv1 (256,6,24,24)", "fc1 (256,120)")
# What the dry run times (on the CPU), so that it writes and reads a benchmark JSON as the check does.
DRY_RUN_BENCH = "forward+backward-256x120"


def main(argv: list[str] | None = None) -> int:
    """Run every step, write OUTDIR's files after each one (a check cut short still leaves what it
    measured) and print the short tables; returns 0 when every step that ran succeeded, else 1."""
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
        "--only",
        type=lambda text: text.split(","),
        default=list(STEP_NAMES),
        metavar="STEPS",
        help=f"run only these of {','.join(STEP_NAMES)} (comma-separated; install, versions and glue "
        "always run): a rerun after a fix",
    )
    parser.add_argument(
        "--tests-from",
        type=Path,
        metavar="FILE",
        help="run the tests FILE lists (pytest node ids or files, one a line) instead of the whole "
        "suite: a rerun of what a check failed or did not reach",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="rehearse every step without a GPU (CPU, few tests, stand-in driver)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(STEP_NAMES))
    if unknown:
        parser.error(f"--only: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEP_NAMES)}")
    if args.tests_from is not None and not (args.tests_from.is_file() and listed_tests(args.tests_from)):
        parser.error(f"--tests-from: expected a file listing tests, got {args.tests_from}")
    outdir = args.outdir.resolve()
    if outdir.exists() and any(outdir.iterdir()):
        parser.error(f"{outdir} is not empty")
    outdir.mkdir(parents=True, exist_ok=True)
    _interruptible()
    if args.dry_run:
        # On the GPU machine tritonbn is installed by the install step, in a child whose import
        # paths this process never sees: the rehearsal makes sure this process needs none.
        sys.modules["tritonbn"] = None  # type: ignore[assignment]
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
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    state: dict[str, object] = {"steps": [], "host": {}, "host_compiled": {}, "bench": {}, "training": {}}
    steps: list[dict] = state["steps"]  # type: ignore[assignment]

    def publish() -> str:
        """Write results.json and summary.md from what has run so far; returns the summary."""
        results = report.with_records(
            {
                "schema": report.SCHEMA,
                "kind": "gpu-check" if not args.dry_run else "gpu-check-dry-run",
                "quick": args.quick,
                "datetime": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "machine_info": state["bench"].get("machine_info") or {"tritonbn": environment},
                "commit_info": state["bench"].get("commit_info", {}),
                "environment": environment,
                "steps": steps,
                "host_overhead": state["host"],
                "host_overhead_compiled": state["host_compiled"],
                "training": state["training"],
                "planned": state["bench"].get("planned", []),
                "benchmarks": state["bench"].get("benchmarks", []),
            }
        )
        (outdir / "results.json").write_text(
            json.dumps({k: v for k, v in results.items() if not k.endswith("records")}, indent=1) + "\n"
        )
        try:
            summary = summary_markdown(results)
        except Exception:  # results.json is written: a report bug must not end the check here
            summary = "# tritonbn GPU check: the summary failed\n\n```\n" + traceback.format_exc() + "```\n"
        (outdir / "summary.md").write_text(summary)
        return summary

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
    versions = versions_step(python, device, budget("versions"))
    environment: dict[str, object] = versions["environment"]
    steps.append(versions)
    publish()
    steps.append(run_step("glue", [python, "-m", "tritonbn.glue"], budget("glue"), log))
    publish()

    def train(name: str) -> None:
        options = TRAININGS[name]
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
        key = _train_budget(name)
        if key not in args.only:
            step = skipped(f"train {name}", shlex.join(command), "not selected (--only)")
        elif not data_dir.is_dir():
            step = skipped(f"train {name}", shlex.join(command), f"no Fashion-MNIST folder {data_dir}")
        else:
            step = run_step(f"train {name}", command, budget(key), log)
        steps.append(step)
        state["training"][name] = training_summary(step, run_dir)  # type: ignore[index]
        publish()

    with tempfile.TemporaryDirectory() as scratch:
        if "tests" in args.only:
            # The suite and, beside it, the benchmark suites once each untimed: their checks on
            # this device, and every kernel and compiled graph they need built into the caches,
            # so that the timed run below spends its budget timing.
            listed = None if args.tests_from is None else listed_tests(args.tests_from)
            if listed is not None:
                # Their files, collected whole: an id pytest does not know (a list made on another
                # machine, whose torch parametrizes differently) is left out, not fatal to the rest.
                tests = list(dict.fromkeys(entry.split("::", 1)[0] for entry in listed))
            else:
                tests = ["tests/test_compat.py"] if args.dry_run else tests_in_order()
            warm_output = Path(scratch) / "warm.log"
            warm = None
            if "bench" in args.only:
                warm = start_background(
                    [
                        *pytest,
                        *BENCH_SUITES,
                        "--benchmark-disable",
                        f"--bench-budget={max(budget('tests') - BENCH_WIND_DOWN, 1):.0f}",
                        *(["--bench-quick"] if args.quick else []),
                    ],
                    warm_output,
                )
            ids = collect_tests(pytest, tests)
            missing: list[str] = []
            if ids is not None and listed is not None:
                ids, missing = select_listed(ids, listed)
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
            if missing:
                tests_step["not_found"] = missing
                tests_step["status"] += f"; {len(missing)} listed test(s) not found, left out"
            steps.append(tests_step)
            if warm is not None:
                _finish([warm], time.monotonic() + WARM_GRACE)
                with log.open("a") as sink:
                    sink.write("\n== bench warm-up (untimed, beside the tests)\n")
                    sink.write(warm_output.read_text(errors="replace"))
                outcome = count_outcomes(warm_output)
                print(f"== bench warm-up: {outcome}", flush=True)
            publish()
        else:
            steps.append(skipped("tests", "pytest tests", "not selected (--only)"))

        if "bench" in args.only:
            bench_json = Path(scratch) / "bench.json"
            bench_budget = budget("bench")
            command = [
                *pytest,
                *BENCH_SUITES,
                "--benchmark-quiet",
                f"--benchmark-json={bench_json}",
                f"--bench-budget={max(bench_budget - BENCH_WIND_DOWN, 1):.0f}",
            ]
            if args.dry_run:  # a CPU times only the LeNet layers, and slowly: time one case
                command = [*command, "-k", DRY_RUN_BENCH]
            steps.append(
                run_step("bench", command + (["--bench-quick"] if args.quick else []), bench_budget, log)
            )
            state["bench"] = json.loads(bench_json.read_text()) if bench_json.is_file() else {}
        else:
            steps.append(skipped("bench", "pytest " + " ".join(BENCH_SUITES), "not selected (--only)"))
        publish()

        # The LeNet epoch both ways before the diagnostics: the figures first.
        train("tritonbn")
        train("torch")

        failed = failed_tests(outdir / "tests.log")
        if failed and "tests" in args.only:  # the same tests on the Python Function: is it the glue?
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
            publish()

        host_json = Path(scratch) / "host.json"
        host_command = [python, "bench/host_overhead.py", "--json", str(host_json)]
        host_command += ["--repeats", "3", "--steps", "10"] if pick else []
        if "host" in args.only:
            steps.append(run_step("host overhead", host_command, budget("host"), log))
            state["host"] = json.loads(host_json.read_text()) if host_json.is_file() else {}
        else:
            steps.append(skipped("host overhead", shlex.join(host_command), "not selected (--only)"))
        publish()

    sanitizer = shutil.which("compute-sanitizer")
    sanitize = [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3"]
    sanitize += [*pytest, *SANITIZED_TESTS]
    if "sanitizer" not in args.only:
        steps.append(skipped("sanitizer", shlex.join(sanitize), "not selected (--only)"))
    elif sanitizer is None or args.dry_run:
        why = "dry run" if args.dry_run else "compute-sanitizer not found"
        steps.append(skipped("sanitizer", shlex.join(sanitize), why))
    else:
        steps.append(run_step("sanitizer", sanitize, budget("sanitizer"), log))
    publish()

    train("tritonbn-compile")

    table = outdir / "tuning-table.json"
    tune_budget = budget("tune")
    tune_command = [python, "-m", "tritonbn.tune", "--budget-s", f"{max(tune_budget - 15, 5):.0f}"]
    tune_command += ["--out", str(table)]
    if "tune" not in args.only:
        steps.append(skipped("tune", shlex.join(tune_command), "not selected (--only)"))
    elif args.dry_run:
        steps.append(skipped("tune", shlex.join(tune_command), "dry run (needs CUDA)"))
    else:
        steps.append(run_step("tune", tune_command, tune_budget, log))
    publish()

    with tempfile.TemporaryDirectory() as scratch:
        compiled_json = Path(scratch) / "host-compiled.json"
        compiled_command = [python, "bench/host_overhead.py", "--compiled", "--layers", *COMPILED_HOST_LAYERS]
        compiled_command += ["--repeats", "3", "--steps", "10", "--json", str(compiled_json)]
        if "host-compiled" in args.only:
            steps.append(run_step("host compiled", compiled_command, budget("host-compiled"), log))
            if compiled_json.is_file():
                state["host_compiled"] = json.loads(compiled_json.read_text())
        else:
            steps.append(skipped("host compiled", shlex.join(compiled_command), "not selected (--only)"))
    summary = publish()
    print("\n" + summary, flush=True)
    return 0 if all(step["status"].startswith(("ok", "skipped")) for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
