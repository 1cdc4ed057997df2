"""One command for a GPU machine: install, test, train and benchmark tritonbn, and write the results.

    python bench/gpu_check.py OUTDIR [--data-dir DIR] [--quick]

Run from anywhere on a checkout; needs no network. The data travels with the checkout: before the
device call, ``mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
data/fashion-mnist/`` here (``data/`` is gitignored, so name it in the call's ``carry``). The steps,
each with a time budget (a step that fails or runs out of time is recorded and the next one runs),
all inside about six minutes:

1. ``pip install --no-deps --no-build-isolation -e .`` (the machine's torch and triton stay);
2. ``pytest -q --maxfail=10 tests`` on CUDA, its output in OUTDIR/tests.log;
3. the seed's LeNet training on the GPU with ``--bn tritonbn`` and ``--bn torch`` (Fashion-MNIST
   from --data-dir, by default the checkout's data/fashion-mnist) into OUTDIR/train-tritonbn and
   OUTDIR/train-torch (metrics.json and curves.png; the checkpoint is dropped);
4. the benchmark suites (``pytest bench --benchmark-json``), given whatever time is left.

OUTDIR then holds results.json (bench/results/README.md describes it; copy it to
bench/results/<gpu>-<date>.json and run bench/render_benchmarks.py), summary.md, tests.log,
run.log (the other steps' output) and the two training folders: eight files. ``--quick`` trains
one epoch and times only float32 forward+backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parent.parent
# Seconds for the whole check, and the most each step may take (normal, --quick). The benchmarks
# get what is left before the deadline, less the time kept to collect, write and report.
DEADLINE = 345
BUDGETS = {"install": (60, 60), "tests": (150, 150), "train": (60, 40)}
BENCH_RESERVE = 10
BENCH_WIND_DOWN = 40
MIN_STEP = 20
# Seconds to wait for the last output of a step once its process has ended.
COPY_GRACE = 10
TRAINED_WITH = ("tritonbn", "torch")
KEPT_TRAIN_FILES = ("metrics.json", "curves.png")


def _copy_lines(source, sinks) -> None:
    for line in iter(source.readline, ""):
        for sink in sinks:
            sink.write(line)
            sink.flush()


def run_step(name: str, command: list[str], budget: float, log: Path) -> dict[str, object]:
    """Run ``command`` in the checkout for at most ``budget`` seconds, its output appended to
    ``log`` and echoed here. Returns the step's record: command, status, return code, seconds."""
    record: dict[str, object] = {"name": name, "command": shlex.join(command), "budget_s": round(budget)}
    if budget < MIN_STEP:
        return {**record, "status": "skipped: out of time", "returncode": None, "seconds": 0.0}
    print(f"\n== {name}: {record['command']} (budget {budget:.0f} s)", flush=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRITONBN_")}
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n== {name}: {record['command']}\n")
        process = subprocess.Popen(command, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        copier = threading.Thread(target=_copy_lines, args=(process.stdout, (sink, sys.stdout)))
        copier.start()
        try:
            returncode = process.wait(timeout=budget)
            status = "ok" if returncode == 0 else f"failed (exit status {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            status = f"timed out after {budget:.0f} s"
        copier.join(timeout=COPY_GRACE)
        sink.write(f"== {name}: {status}\n")
    seconds = time.monotonic() - started
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {**record, "status": status, "returncode": returncode, "seconds": round(seconds, 1)}


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
            epochs=len(epochs), loss=epochs[-1]["loss"], train_acc=epochs[-1]["train_acc"],
            test_acc=epochs[-1]["test_acc"], first_epoch_sec=times[0],
            later_epoch_sec=statistics.median(times[1:]) if len(times) > 1 else None,
        )
    summary["dispatch"] = {layer: entry.get("train", {}).get("kernel") for layer, entry in
                           record.get("dispatch", {}).items()}
    return summary


def fallback_machine_info() -> dict[str, object]:
    """machine_info for a run whose benchmarks wrote none: the device and versions, no bandwidth."""
    import torch
    from environment import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"tritonbn": environment(device)}


def summary_markdown(results: dict) -> str:
    """OUTDIR/summary.md: the steps, the targets, the training runs and forward+backward float32."""
    info = report.machine(results)
    steps = report.markdown_table(
        ["step", "status", "seconds", "budget s"],
        [[s["name"], s["status"], f"{s['seconds']:.0f}", str(s["budget_s"])] for s in results["steps"]],
    )
    copy = info.get("copy_gbps")
    return "\n\n".join([
        f"# tritonbn GPU check, {results['datetime']}",
        f"{info.get('device_name')} (driver {info.get('driver')}, CUDA {info.get('cuda_runtime')}), "
        f"torch {info.get('torch')}, triton {info.get('triton')}; copy bandwidth "
        + (f"{copy:.0f} GB/s" if copy else "not measured") + (" (--quick)" if results["quick"] else ""),
        "## Steps\n\n" + steps,
        "## Targets\n\n" + report.targets_table(report.targets(results)),
        "## LeNet training\n\n" + report.training_table(results["training"]),
        "## forward+backward, float32\n\n" + report.headline_table(results["records"]),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every step, write OUTDIR's files and print the short tables; returns 0 when every step
    succeeded, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="new or empty folder for the results")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "fashion-mnist",
                        help="folder with the Fashion-MNIST .gz files (default: data/fashion-mnist)")
    parser.add_argument("--quick", action="store_true", help="one training epoch, float32 forward+backward")
    args = parser.parse_args(argv)
    outdir = args.outdir.resolve()
    if outdir.exists() and any(outdir.iterdir()):
        parser.error(f"{outdir} is not empty")
    outdir.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir.resolve()
    pick = 1 if args.quick else 0
    started = time.monotonic()

    def left() -> float:
        return DEADLINE - (time.monotonic() - started)

    log = outdir / "run.log"
    python = sys.executable

    steps = [run_step("install", [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                  "-e", "."], min(BUDGETS["install"][pick], left()), log)]
    steps.append(run_step("tests", [python, "-m", "pytest", "-q", "--maxfail=10", "-p", "no:cacheprovider",
                                    "tests"],
                          min(BUDGETS["tests"][pick], left()), outdir / "tests.log"))
    training: dict[str, dict[str, object]] = {}
    for bn in TRAINED_WITH:
        run_dir = outdir / f"train-{bn}"
        command = [python, "-m", "tritonbn.train", "--bn", bn, "--device", "cuda", "--out", str(run_dir),
                   "--quiet", "--data-dir", str(data_dir), *(["--epochs", "1"] if args.quick else [])]
        if not data_dir.is_dir():
            step = {"name": f"train {bn}", "command": shlex.join(command), "budget_s": 0, "seconds": 0.0,
                    "status": f"skipped: no Fashion-MNIST folder {data_dir}", "returncode": None}
        else:
            step = run_step(f"train {bn}", command, min(BUDGETS["train"][pick], left()), log)
        steps.append(step)
        training[bn] = training_summary(step, run_dir)

    with tempfile.TemporaryDirectory() as scratch:
        bench_json = Path(scratch) / "bench.json"
        budget = left() - BENCH_RESERVE
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "--benchmark-quiet",
                   f"--benchmark-json={bench_json}", f"--bench-budget={max(budget - BENCH_WIND_DOWN, 1):.0f}"]
        steps.append(run_step("bench", command + (["--bench-quick"] if args.quick else []), budget, log))
        bench = json.loads(bench_json.read_text()) if bench_json.is_file() else {}

    results = report.with_records({
        "schema": report.SCHEMA,
        "kind": "gpu-check",
        "quick": args.quick,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine_info": bench.get("machine_info") or fallback_machine_info(),
        "commit_info": bench.get("commit_info", {}),
        "steps": steps,
        "training": training,
        "benchmarks": bench.get("benchmarks", []),
    })
    (outdir / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "records"},
                                                    indent=1) + "\n")
    summary = summary_markdown(results)
    (outdir / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 0 if all(step["status"] == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
