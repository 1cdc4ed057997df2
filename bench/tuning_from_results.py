"""A tuning table from GPU benchmark runs: each benchmarked case takes what ran fastest there.

    python bench/tuning_from_results.py RESULTS.json [RESULTS.json ...] [--tuned TABLE.json] --out TABLE.json

The BatchNorm suite (``bench/test_bench_batchnorm.py``) times every case (shape, dtype, memory
format) on torch's own module and on each Triton plan that can run it, forward+backward and eval:
the candidates a tuning table chooses among. Each case with torch and at least one plan timed
becomes an entry of the table (``tritonbn.tuning``, schema 1): forward+backward gives the training
entry, eval the eval one, and the choice is the fastest, torch included. So a case where torch
measured faster runs torch's own batch_norm under ``auto`` once the table is installed, and
``explain()`` quotes the two timings.

Fastest by the wall clock per call (``wall_ms``: a loop of module calls, synchronized once), what
an eager caller waits for: on a small layer that is the host's time, which the device events
(``ms``) only partly see (they start once the L2 flush before each run is done, and on the H200,
2026-11-30, a LeNet layer's event time moved by a third between two runs). A record without a wall
clock (an older file) counts by ``ms``. Given several runs of the same GPU, each candidate's time is
its median over the runs that timed it.

A Triton plan other than the one the dispatcher took on its own is chosen only where it ran faster by
more than NOISE (on a host-bound layer, two runs of the same call differ by that much) and, where both
were replayed from a CUDA graph, was not slower on the device there.

A plan's timing is its forced run; where the budget of the run stopped before the forced plans,
the automatic dispatcher's run stands for the plan it took (on a GPU with no table yet, as on the
first run, that plan with default tunables).

``--tuned`` names the tuner's table of the same GPU (``bench/gpu_check.py`` writes it as
``tuning-table.json``): its entries fill the cases no run benchmarked (the benchmarks time the
modules as a caller runs them, the tuner its own harness by device events), and a candidate it
rejected for a case (its ``failures`` and ``dropped``, which the table keeps) is not chosen there.
The device is the runs'; ``--out`` is written atomically, its summary printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import report
import torch

from tritonbn import PLANS, tune, tuning

# The benchmark's pass → the table's mode.
MODES = {"forward+backward": True, "eval": False}
# How much faster than the dispatcher's own plan another Triton plan must run to be chosen instead.
NOISE = 0.10


def _case(record: dict) -> tune.Case:
    dtype = getattr(torch, record["dtype"])
    channels_last = record["layout"] == "channels_last"
    return tune.Case(tuple(record["shape"]), dtype, channels_last, MODES[record["pass"]])


def _time(record: dict) -> float:
    """The time a benchmark record counts by: its wall clock per call where recorded, else ``ms``."""
    return float(record.get("wall_ms") or record["ms"])


def _device_time(record: dict) -> float | None:
    """The record's time per call replayed from a CUDA graph (device work alone), where captured."""
    value = record.get("cudagraph_ms")
    return None if value is None else float(value)


def automatic_plans(runs: list[dict]) -> dict[tune.Case, str]:
    """Per case, the Triton plan the dispatcher took on its own (in the last of ``runs`` that timed it)."""
    return {
        _case(record): record["plan"]
        for run in runs
        for record in run["records"]
        if record.get("pass") in MODES and record["backend"] == "tritonbn" and record.get("plan") in PLANS
    }


def choose(times: dict[str, float], automatic: str | None, device: dict[str, float] | None = None) -> str:
    """The fastest of ``times``; but another Triton plan replaces the dispatcher's own plan
    ``automatic`` only where it ran faster by more than NOISE and, where both were replayed from a
    CUDA graph (``device``), not slower there: on a host-bound layer the wall clock moves by more
    than NOISE between runs, and a plan with more launches is not faster on the host."""
    best = min(sorted(times), key=times.__getitem__)
    if best in ("torch", automatic) or automatic not in times:
        return best
    device = device or {}
    within_noise = times[automatic] <= (1 + NOISE) * times[best]
    slower_on_device = best in device and automatic in device and device[best] > device[automatic]
    return automatic if within_noise or slower_on_device else best


def measured_cases(
    runs: list[dict], read: Callable[[dict], float | None] = _time
) -> dict[tune.Case, dict[str, float]]:
    """Per case, the milliseconds of torch and of each Triton plan (its forced run, else the
    automatic dispatcher's run of it), from the BatchNorm suite's records of ``runs``: per run as
    ``read`` reads them (records it reads as None left out), then the median over the runs."""
    times: dict[tune.Case, dict[str, list[float]]] = {}
    for run in runs:
        forced: dict[tune.Case, dict[str, float]] = {}
        automatic: dict[tune.Case, dict[str, float]] = {}
        for record in run["records"]:
            if record.get("pass") not in MODES or (value := read(record)) is None:
                continue
            backend = record["backend"]
            if backend == "torch":
                forced.setdefault(_case(record), {})["torch"] = value
            elif backend in PLANS and record.get("plan") == backend:
                forced.setdefault(_case(record), {})[backend] = value
            elif backend == "tritonbn" and record.get("plan") in PLANS:
                automatic.setdefault(_case(record), {})[record["plan"]] = value
        for case, plans in automatic.items():
            for plan, ms in plans.items():
                forced.setdefault(case, {}).setdefault(plan, ms)
        for case, labels in forced.items():
            for label, ms in labels.items():
                times.setdefault(case, {}).setdefault(label, []).append(ms)
    return {
        case: {label: statistics.median(ms) for label, ms in labels.items()} for case, labels in times.items()
    }


def _device(run: dict, tuned: dict | None) -> tuple[tuple[str, tuple[int, int]], int]:
    """((name, capability), SM count) of the GPU the run measured."""
    info = report.machine(run)
    if not report.is_gpu(run):
        raise SystemExit(
            f"{run['path']}: not a GPU run (device {info.get('device_type')!r}): on a CPU tritonbn "
            "runs torch's own batch_norm, so its timings choose nothing"
        )
    capability = info.get("capability")
    if capability is None and tuned is not None and tuned["device"]["name"] == info.get("device_name"):
        capability = tuned["device"]["capability"]
    if capability is None:
        raise SystemExit(
            f"{run['path']}: the run does not record the GPU's compute capability; pass --tuned with "
            "the tuner's table of the same GPU"
        )
    return (str(info["device_name"]), (int(capability[0]), int(capability[1]))), int(info["sm_count"])


def _key(entry: dict) -> tuple:
    return entry["layout"], entry["dtype"], entry["mode"], tuple(entry["shape"])


def build(runs: list[dict], tuned: dict | None = None) -> dict:
    """The table (``tritonbn.tuning`` schema 1) of the benchmark ``runs`` (``report.load``, one GPU),
    with the entries of ``tuned`` (a table of the same GPU) for the cases they did not time."""
    identities = {_device(run, tuned) for run in runs}
    if len(identities) > 1:
        raise SystemExit(f"the runs measured different GPUs: {sorted(identities)}")
    identity, sms = identities.pop()
    if tuned is not None and tuned["device"]["name"] != identity[0]:
        raise SystemExit(f"--tuned measured {tuned['device']['name']!r}, the runs {identity[0]!r}")
    # A candidate the tuner dropped from a case (wrong against the float64 reference, spilling)
    # is not chosen there on the benchmark's word: its check is the weaker one.
    failures = tuned.get("failures", []) if tuned is not None else []
    dropped = tuned.get("dropped", []) if tuned is not None else []
    rejected = {(item["case"], item["candidate"]) for item in failures + dropped}
    entries = []
    automatic = automatic_plans(runs)
    device = measured_cases(runs, _device_time)
    for case, times in measured_cases(runs).items():
        kept = {label: ms for label, ms in times.items() if (str(case), label) not in rejected}
        if "torch" in kept and len(kept) >= 2:
            entries.append(tune.table_entry(case, kept, choose(kept, automatic.get(case), device.get(case))))
    have = {_key(entry) for entry in entries}
    if tuned is not None:
        entries += [entry for entry in tuned["entries"] if _key(entry) not in have]
    info = report.machine(runs[-1])
    return tune.table_document(
        identity,
        sms,
        entries,
        versions={name: info.get(name) for name in ("torch", "triton", "tritonbn")},
        source={
            "benchmarks": [str(run["path"]) for run in runs],
            "benchmarks_dates": [run.get("datetime") for run in runs],
            "tuned": None if tuned is None else tuned.get("date"),
        },
        timer="the benchmark suite's wall clock per module call (median ms over the runs; device "
        "time where a record has no wall clock); the tuner's entries keep their own",
        failures=failures,
        dropped=dropped,
    )


def summary(table: dict) -> str:
    """One line an entry: the case, the choice and its time against torch's."""
    lines = []
    for entry in table["entries"]:
        case = f"{entry['mode']} {entry['dtype']} {entry['layout']} {tuple(entry['shape'])}"
        ratio = entry["ratio_to_torch"]
        verdict = "torch" if entry["choice"] == "torch" else f"{entry['choice']} ({1 / ratio:.2f}x torch)"
        lines.append(f"{case}: {verdict}")
    routed = sum(entry["choice"] == "torch" for entry in table["entries"])
    lines.append(f"{len(table['entries'])} entries, {routed} routed to torch")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="GPU runs' results of one GPU (bench/results/<gpu>-<date>.json)"
    )
    parser.add_argument(
        "--tuned", type=Path, help="the tuner's table of the same GPU, for the cases no run benchmarked"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the table")
    args = parser.parse_args(argv)
    runs = [report.load(path) for path in args.results]
    tuned = None
    if args.tuned:
        tuning.load_table(args.tuned)  # a clear TableError on a malformed table
        tuned = json.loads(args.tuned.read_text())
    table = build(runs, tuned)
    tune.write_table(args.out, table)
    print(summary(table))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
