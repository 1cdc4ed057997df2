"""A tuning table from a GPU benchmark run: each benchmarked case takes what ran fastest there.

    python bench/tuning_from_results.py RESULTS.json [--tuned TABLE.json] --out TABLE.json

The BatchNorm suite (``bench/test_bench_batchnorm.py``) times every case (shape, dtype, memory
format) on torch's own module and on each Triton plan that can run it, forward+backward and eval:
the candidates a tuning table chooses among, timed the way ``tritonbn-tune`` times them (device
events, median). Each case with torch and at least one plan timed becomes an entry of the table
(``tritonbn.tuning``, schema 1): forward+backward gives the training entry, eval the eval one, and
the choice is the fastest, torch included. So a case where torch measured faster runs torch's own
batch_norm under ``auto`` once the table is installed, and ``explain()`` quotes the two timings.

A plan's timing is its forced run; where the budget of the run stopped before the forced plans,
the automatic dispatcher's run stands for the plan it took (on a GPU with no table yet, as on the
first run, that plan with default tunables).

``--tuned`` names the tuner's table of the same GPU (``bench/gpu_check.py`` writes it as
``tuning-table.json``): its entries are kept whole, since the tuner also tried tunables and checked
every candidate against float64, and the benchmark's fill the cases it has no entry for, without
the candidates it rejected there (its ``failures`` and ``dropped``, which the table keeps). The
device is the benchmark run's; ``--out`` is written atomically, its summary printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import report
import torch

from tritonbn import PLANS, tune, tuning

# The benchmark's pass → the table's mode.
MODES = {"forward+backward": True, "eval": False}


def _case(record: dict) -> tune.Case:
    dtype = getattr(torch, record["dtype"])
    channels_last = record["layout"] == "channels_last"
    return tune.Case(tuple(record["shape"]), dtype, channels_last, MODES[record["pass"]])


def measured_cases(records: list[dict]) -> dict[tune.Case, dict[str, float]]:
    """Per case, the milliseconds of torch and of each Triton plan (its forced run, else the
    automatic dispatcher's run of it), from the BatchNorm suite's ``records``."""
    forced: dict[tune.Case, dict[str, float]] = {}
    automatic: dict[tune.Case, dict[str, float]] = {}
    for record in records:
        if record.get("pass") not in MODES:
            continue
        backend = record["backend"]
        if backend == "torch":
            forced.setdefault(_case(record), {})["torch"] = float(record["ms"])
        elif backend in PLANS and record.get("plan") == backend:
            forced.setdefault(_case(record), {})[backend] = float(record["ms"])
        elif backend == "tritonbn" and record.get("plan") in PLANS:
            automatic.setdefault(_case(record), {})[record["plan"]] = float(record["ms"])
    for case, plans in automatic.items():
        for plan, ms in plans.items():
            forced.setdefault(case, {}).setdefault(plan, ms)
    return forced


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


def build(run: dict, tuned: dict | None = None) -> dict:
    """The table (``tritonbn.tuning`` schema 1) of the benchmark ``run`` (``report.load``), the
    entries of ``tuned`` (a table of the same GPU) first."""
    identity, sms = _device(run, tuned)
    if tuned is not None and tuned["device"]["name"] != identity[0]:
        raise SystemExit(f"--tuned measured {tuned['device']['name']!r}, the run {identity[0]!r}")
    entries = list(tuned["entries"]) if tuned is not None else []
    have = {_key(entry) for entry in entries}
    # A candidate the tuner dropped from a case (wrong against the float64 reference, spilling)
    # is not chosen there on the benchmark's word: its check is the weaker one.
    failures = tuned.get("failures", []) if tuned is not None else []
    dropped = tuned.get("dropped", []) if tuned is not None else []
    rejected = {(item["case"], item["candidate"]) for item in failures + dropped}
    benchmarked = []
    for case, times in measured_cases(run["records"]).items():
        kept = {label: ms for label, ms in times.items() if (str(case), label) not in rejected}
        if "torch" in kept and len(kept) >= 2:
            benchmarked.append(tune.table_entry(case, kept))
    entries += [entry for entry in benchmarked if _key(entry) not in have]
    info = report.machine(run)
    return tune.table_document(
        identity,
        sms,
        entries,
        versions={name: info.get(name) for name in ("torch", "triton", "tritonbn")},
        source={
            "benchmarks": str(run["path"]),
            "benchmarks_date": run.get("datetime"),
            "tuned": None if tuned is None else tuned.get("date"),
        },
        timer="the benchmark suite's device time (median ms); the tuner's entries keep their own",
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
    parser.add_argument("results", type=Path, help="a GPU run's results (bench/results/<gpu>-<date>.json)")
    parser.add_argument("--tuned", type=Path, help="the tuner's table of the same GPU, whose entries win")
    parser.add_argument("--out", type=Path, required=True, help="where to write the table")
    args = parser.parse_args(argv)
    run = report.load(args.results)
    tuned = None
    if args.tuned:
        tuning.load_table(args.tuned)  # a clear TableError on a malformed table
        tuned = json.loads(args.tuned.read_text())
    table = build(run, tuned)
    tune.write_table(args.out, table)
    print(summary(table))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
