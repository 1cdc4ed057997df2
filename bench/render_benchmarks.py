"""Render docs/benchmarks.md and its speedup chart from the committed bench/results/*.json.

    python bench/render_benchmarks.py [--results bench/results] [--out docs/benchmarks.md]

Every number on the page comes from a results file; the page says which file, machine and date,
and, while no GPU run is committed, says so instead of judging the GPU targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import host_overhead
import report
from measure import PASS_TRAFFIC

ROOT = Path(__file__).resolve().parent.parent
CHART_BACKENDS = ("tritonbn", "torch.compile", "reference")

REPRODUCE = """\
- GPU (one H200, about nine minutes, no network): `python bench/gpu_check.py OUTDIR` on a checkout with
  the Fashion-MNIST `.gz` files in `data/fashion-mnist/`, then
  `cp OUTDIR/results.json bench/results/<gpu>-<date>.json`.
- Benchmarks alone, on whatever device is present: `pytest bench --benchmark-json=bench/results/<name>.json`
  (`--bench-quick` for float32 forward+backward only, `--bench-budget SECONDS` to cap the run). Without
  CUDA only the LeNet layers run, on torch, tritonbn (its CPU fallback) and the reference.
- The CPU file here: `OMP_NUM_THREADS=1 pytest bench -p no:cacheprovider
  --benchmark-json=bench/results/cpu-<date>.json` (one torch thread: the 2-core machine was shared).
- This page and its chart: `python bench/render_benchmarks.py`."""


HOST_METHOD = """\
What a user waits for in eager mode when a layer's GPU work is short: `bench/host_overhead.py` runs a chain
of 8 BatchNorm layers forward and backward and reports the host time per layer (best of 9 timings of 40
steps, tritonbn's and torch's taken in turns) and the kernel launches per pass. Without CUDA, tritonbn goes
through Triton's real launch path under a stand-in CUDA driver (nothing executes, and a real driver adds its
own time to each launch; the process keeps freed memory, as CUDA's caching allocator does) and torch runs
its CPU layer on a tiny tensor, one thread. The "+ sigmoid" rows time LeNet's block: tritonbn's BatchNorm
with the activation fused against torch's BatchNorm then `nn.Sigmoid`. Each file says whether tritonbn's
remembered calls ran the C++ glue (`tritonbn/eager.py`). The "compiled" columns, where a file has them
(`--compiled`), time the same chain through `torch.compile` in its default mode (no CUDA graphs), compiled
afresh for each layer: what each call of a compiled graph costs the host. Reproduce: `python
bench/host_overhead.py [--compiled] --json bench/results/host-overhead/<machine>-<date>-<HHMM>.json`."""


def method_section() -> str:
    traffic = report.markdown_table(
        ["pass", "bytes a pass-optimal kernel moves"],
        [
            [name, f"{tensors} × bytes(x) + {vectors} float32 vectors of C"]
            for name, (tensors, vectors) in PASS_TRAFFIC.items()
        ],
    )
    return "\n".join(
        [
            "## Method",
            "",
            "Each case (shape, dtype, layout) is timed for four passes (training forward, backward alone, "
            "eval forward, forward+backward) on every backend, as modules: `torch.nn.BatchNorm1d/2d` "
            "(*torch*, the baseline of every speedup), `tritonbn.BatchNorm1d/2d` on its dispatcher "
            "(*tritonbn*), on each forced Triton plan that applies, on the plain-torch *reference*, and "
            "`torch.compile` of torch's module. Inputs are fresh standard-normal tensors; the running "
            "statistics start at (0, 1). Each result is checked once (shape, dtype, finite values, a "
            "property of batch norm) before it is timed.",
            "",
            "On CUDA, `triton.testing.do_bench` times every run with CUDA events after flushing the L2 "
            "cache; on a CPU, `torch.utils.benchmark.Timer.blocked_autorange` times blocks of calls "
            "(`bench/measure.py`; a results file's *timer* row names the harness that timed it). The "
            "figure is the median run (± half the interquartile range). GB/s divides the bytes below by "
            "the median; "
            "% of copy compares that with a device-to-device copy timed the same way in the same "
            "session. A cell reads `median ±spread · speedup over torch · % of copy`.",
            "",
            traffic,
        ]
    )


def speedup_chart(run: dict, path: Path) -> bool:
    """Bar chart of forward+backward float32 speedups over torch, per case and backend; False
    (nothing written) when the run has none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    records = report.of_pass(report.select(run["records"], dtype="float32"), "forward+backward")
    groups = list(dict.fromkeys(r["group"] for r in records))
    backends = [b for b in CHART_BACKENDS if report.select(records, backend=b)]
    if not groups or not backends:
        return False
    figure = Figure(figsize=(max(8.0, 0.55 * len(groups)), 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    width = 0.8 / len(backends)
    for index, backend in enumerate(backends):
        by_group = {r["group"]: r.get("speedup_vs_torch") for r in report.select(records, backend=backend)}
        heights = [by_group.get(group) or 0.0 for group in groups]
        axes.bar(
            [g + (index - (len(backends) - 1) / 2) * width for g in range(len(groups))],
            heights,
            width,
            label=backend,
            color=f"C{index}",
        )
    axes.axhline(1.0, color="black", linewidth=0.8)
    if report.is_gpu(run):
        axes.axhline(
            report.SPEEDUP_TARGET,
            color="gray",
            linestyle="--",
            linewidth=0.8,
            label=f"{report.SPEEDUP_TARGET}x (4-D geomean target)",
        )
    labels = [
        " ".join(group.split()[1:4:2]).replace("channels_last", "NHWC").replace("contiguous", "")
        for group in groups
    ]
    axes.set_xticks(range(len(groups)), labels, rotation=60, ha="right", fontsize="small")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%gx"))
    axes.set_ylabel("speedup over torch.nn.BatchNorm (×)")
    kind = "GPU" if report.is_gpu(run) else "CPU"
    axes.set_title(f"forward+backward, float32 — {kind}: {report.machine(run).get('device_name')}")
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return True


def shown_path(path: Path, root: Path) -> Path:
    """``path`` relative to the checkout when it lies inside it."""
    path = path.resolve()
    return path.relative_to(root) if path.is_relative_to(root) else path


def run_section(run: dict, root: Path) -> str:
    """A results file: where it ran, its targets, forward+backward float32, then every table."""
    info = report.machine(run)
    kind = "GPU" if report.is_gpu(run) else "CPU"
    copy = info.get("copy_gbps")
    facts = [
        ["file", f"`{shown_path(run['path'], root)}`"],
        ["date", str(run.get("datetime"))],
        ["device", f"{kind}: {info.get('device_name')}"],
        ["driver / CUDA", f"{info.get('driver')} / {info.get('cuda_runtime')}" if kind == "GPU" else "—"],
        ["torch threads", str(info.get("torch_threads"))],
        ["versions", ", ".join(f"{name} {info.get(name)}" for name in ("torch", "triton", "tritonbn"))],
        ["copy bandwidth", f"{copy:.1f} GB/s" if copy else "not measured"],
        ["timer", str(info.get("timer"))],
        ["timed benchmarks", str(len(run["records"]))],
    ]
    parts = [
        f"### {kind} run: {info.get('device_name')}, {str(run.get('datetime'))[:10]}",
        report.markdown_table(["", ""], facts),
        "Targets\n\n" + report.targets_table(report.targets(run)),
    ]
    if run.get("training"):
        parts.append("LeNet training in the same check\n\n" + report.training_table(run["training"]))
    if run["records"]:
        parts.append("forward+backward, float32\n\n" + report.headline_table(run["records"]))
        parts.append(
            "<details><summary>Every case</summary>\n\n"
            + report.shape_tables(run["records"])
            + "\n\n</details>"
        )
    if run.get("fallback_records"):
        parts.append(
            "CPU fallback timed in pairs (`bench/test_bench_fallback.py`): tritonbn's module and "
            "torch.nn's, forward+backward float32, in alternating blocks of calls; each adjacent "
            "pair gives a ratio, so that the machine's drift, larger than the difference, cancels"
            "\n\n" + report.fallback_table(run["fallback_records"])
        )
    if run.get("activation_records"):
        parts.append(
            "Fused activation: `tritonbn.BatchNorm2d/1d(activation=...)` against "
            "`torch.nn.BatchNorm2d/1d` then the activation module, forward+backward "
            "float32; held = memory a training forward leaves for the backward (CUDA only)"
            "\n\n" + report.activation_table(run["activation_records"])
        )
    return "\n\n".join(parts)


def host_section(host_runs: list[tuple[Path, dict]], root: Path) -> str:
    """The host time per layer of each bench/host_overhead.py result (a file of its own, or a GPU
    check's), in the order given."""
    if not host_runs:
        return "No host-overhead results file is committed yet (`bench/results/host-overhead/`)."
    parts = []
    for path, run in host_runs:
        parts.append(
            f"From `{shown_path(path, root)}` ({run.get('datetime', '?')}, "
            f"{run.get('machine', '?')}, torch {run['torch']}, triton {run['triton']}):\n\n"
            + host_overhead.report(run)
        )
    return "\n\n".join(parts)


def render(
    runs: list[dict], chart: Path, root: Path, host_runs: list[tuple[Path, dict]] | None = None
) -> str:
    """The whole page for ``runs`` (GPU runs first), writing ``chart`` from the first run, with
    the host time per layer of ``host_runs``."""
    gpu = [run for run in runs if report.is_gpu(run)]
    if gpu:
        status = (
            f"{len(gpu)} GPU run(s) committed; the newest is judged first. CPU runs, if any, "
            "measure tritonbn's CPU fallback (PyTorch's own kernel behind its dispatcher)."
        )
    else:
        status = (
            "**No GPU run has been committed yet**, so the GPU targets (forward+backward speedup "
            "over torch, share of copy bandwidth, fused activation over BatchNorm then the "
            "activation, the LeNet epoch) are not judged here and no GPU number appears on this "
            "page."
        )
        if runs:
            status += (
                " The results below come from a CPU only: there tritonbn runs PyTorch's own "
                "kernel behind its dispatcher, so they measure the dispatcher's overhead, not "
                "the Triton kernels."
            )
    parts = [
        "# Benchmarks",
        "Generated by `python bench/render_benchmarks.py` from `bench/results/*.json`; do not edit by hand.",
        status,
    ]
    if runs and speedup_chart(runs[0], chart):
        parts.append(f"![forward+backward float32 speedups]({chart.name})")
    parts.append(method_section())
    parts.append(
        "## Results\n\n"
        + (
            "\n\n".join(run_section(run, root) for run in runs)
            if runs
            else "No results file is committed yet."
        )
    )
    parts.append("## Host time per layer\n\n" + HOST_METHOD + "\n\n" + host_section(host_runs or [], root))
    parts.append("## How to reproduce\n\n" + REPRODUCE)
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page (and chart) from the results folder; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    runs = report.load_all(args.results)
    # A GPU check's own host-overhead measurements first (its results keep them whole), then the
    # files of bench/host_overhead.py, newest first.
    host_runs = [
        (run["path"], run[key])
        for run in runs
        if report.is_gpu(run)
        for key in ("host_overhead", "host_overhead_compiled")
        if run.get(key)
    ]
    host_runs += [
        (path, json.loads(path.read_text()))
        for path in sorted((args.results / "host-overhead").glob("*.json"), reverse=True)
    ]
    chart = args.out.with_name(args.out.stem + "-speedup.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(runs, chart, ROOT, host_runs))
    print(f"wrote {args.out} from {len(runs)} results file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
