"""Write docs/reproduction.md and docs/reproduction/curves.png from tritonbn-train run folders.

    .venv/bin/python docs/render_reproduction.py                  # every docs/reproduction/*/metrics.json
    .venv/bin/python docs/render_reproduction.py RUN_DIR [...]    # chosen run folders, in this order

Each run folder holds a ``metrics.json`` written by ``tritonbn-train``; the folder's name labels the
run. The seed notebook's print-out is quoted below verbatim and parsed like the runs' lines, so every
number on the page comes from this script. Rerunning it rewrites both files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

from tritonbn.train import TrainConfig, epoch_line, plot_curves

DOCS = Path(__file__).resolve().parent
RUNS = DOCS / "reproduction"
PAGE = DOCS / "reproduction.md"
FIGURE = RUNS / "curves.png"

# The acceptance bar of `make train` (issue 4): after 5 epochs with the seed's hyperparameters.
TARGET = {"epochs": 5, "train_acc": 0.88, "test_acc": 0.83}

SEED_SOURCE = (
    "the seed notebook: Dive into Deep Learning (Chinese edition) in its PyTorch port `d2lzh_pytorch`, "
    "section 5.10 批量归一化 (batch normalization); the notebook is not part of this repository, its "
    "two print-outs are quoted verbatim under *Per-epoch results*"
)
# Verbatim from the notebook: the output of cell 3 (its own BatchNorm class) and of cell 5
# (torch.nn.BatchNorm2d/1d), both trained by d2l.train_ch5 on a CUDA device.
SEED_OUTPUT = {
    "seed: notebook BatchNorm": """\
training on  cuda
epoch 1, loss 1.0037, train acc 0.783, test acc 0.836, time 15.5 sec
epoch 2, loss 0.4576, train acc 0.864, test acc 0.849, time 13.3 sec
epoch 3, loss 0.3671, train acc 0.879, test acc 0.854, time 13.5 sec
epoch 4, loss 0.3282, train acc 0.887, test acc 0.837, time 13.4 sec
epoch 5, loss 0.3047, train acc 0.894, test acc 0.846, time 13.2 sec
""",
    "seed: nn.BatchNorm": """\
training on  cuda
epoch 1, loss 0.9908, train acc 0.790, test acc 0.843, time 11.7 sec
epoch 2, loss 0.4552, train acc 0.864, test acc 0.833, time 10.8 sec
epoch 3, loss 0.3676, train acc 0.879, test acc 0.854, time 11.4 sec
epoch 4, loss 0.3325, train acc 0.886, test acc 0.867, time 11.0 sec
epoch 5, loss 0.3096, train acc 0.892, test acc 0.873, time 11.0 sec
""",
}
SEED_BATCH_NORM = {
    "seed: notebook BatchNorm": "the notebook's own class",
    "seed: nn.BatchNorm": "torch.nn.BatchNorm2d/1d",
}
EPOCH_LINE = re.compile(
    r"epoch (\d+), loss (\d+\.\d+), train acc (\d\.\d+), test acc (\d\.\d+), time (\d+\.\d+) sec"
)


def parse_seed(text: str) -> list[dict[str, float]]:
    """The per-epoch records of one quoted print-out."""
    records = []
    for match in EPOCH_LINE.finditer(text):
        epoch, loss, train_acc, test_acc, seconds = match.groups()
        records.append(
            {
                "epoch": int(epoch),
                "loss": float(loss),
                "train_acc": float(train_acc),
                "test_acc": float(test_acc),
                "time_sec": float(seconds),
            }
        )
    if not records:
        raise ValueError("no epoch line in the quoted seed output")
    return records


def load_runs(folders: list[Path]) -> dict[str, dict]:
    """label (folder name) -> metrics.json of each run folder."""
    runs = {}
    for folder in folders:
        path = folder / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"render_reproduction: {path} is missing")
        if folder.name in runs:
            raise SystemExit(f"render_reproduction: two run folders are named {folder.name!r}, its label")
        run = json.loads(path.read_text())
        # A record written before an option existed ran with its default.
        run["config"] = {**dataclasses.asdict(TrainConfig()), **run["config"]}
        if not run["epochs"]:  # started, but interrupted before its first epoch ended
            print(f"render_reproduction: {folder} has no finished epoch, left out", file=sys.stderr)
            continue
        runs[folder.name] = run
    if not runs:
        raise SystemExit(f"render_reproduction: no run folder given and none under {RUNS}")
    return runs


def world_size(run: dict) -> int:
    return (run.get("distributed") or {}).get("world_size", 1)


def bn_description(run: dict) -> str:
    text = {
        "tritonbn": "tritonbn.BatchNorm2d/1d",
        "torch": "torch.nn.BatchNorm2d/1d",
        "reference": "tritonbn.BatchNorm2d/1d on the reference backend",
    }[run["config"]["bn"]]
    if run["config"].get("fuse"):
        text += ", sigmoid fused in (`--fuse`)"
    if run["config"].get("compile"):
        text += ", through torch.compile (`--compile`)"
    if world_size(run) > 1:
        text += f"; as tritonbn.SyncBatchNorm over {world_size(run)} processes (DDP)"
    return text


def device_text(run: dict) -> str:
    device = run["device"]
    if device["type"] == "cpu":
        threads = device["torch_threads"]
        return (
            f"CPU ({device['name']}, {device['cpu_count']} cores, torch on {threads} "
            f"thread{'s' if threads != 1 else ''})"
        )
    return f"CUDA ({device['name']})"


def command(run: dict) -> str:
    if world_size(run) > 1:
        launcher = ["torchrun", f"--nproc_per_node={world_size(run)}", "-m", "tritonbn.train"]
    else:
        launcher = ["tritonbn-train"]
    return shlex.join([*launcher, *run["argv"]])


def meets_target(epochs: list[dict]) -> str:
    if len(epochs) != TARGET["epochs"]:
        return f"n/a ({len(epochs)} epochs)"
    last = epochs[-1]
    ok = last["train_acc"] >= TARGET["train_acc"] and last["test_acc"] >= TARGET["test_acc"]
    return "yes" if ok else "no"


def time_range(epochs: list[dict]) -> str:
    times = [record["time_sec"] for record in epochs]
    return f"{min(times):.1f}–{max(times):.1f} s"


def summary_table(seed: dict[str, list[dict]], runs: dict[str, dict]) -> list[str]:
    rows = [
        "| run | BatchNorm | device | epochs | final loss | final train acc | final test acc | "
        "epoch time (min–max) | meets the bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, epochs in seed.items():
        last = epochs[-1]
        rows.append(
            f"| {label} | {SEED_BATCH_NORM[label]} | CUDA (GPU model not recorded) | "
            f"{len(epochs)} | {last['loss']:.4f} | "
            f"{last['train_acc']:.3f} | {last['test_acc']:.3f} | "
            f"{time_range(epochs)} | {meets_target(epochs)} |"
        )
    for label, run in runs.items():
        epochs = run["epochs"]
        last = epochs[-1]
        rows.append(
            f"| {label} | {bn_description(run)} | {device_text(run)} | {len(epochs)} | "
            f"{last['loss']:.4f} | {last['train_acc']:.3f} | {last['test_acc']:.3f} | "
            f"{time_range(epochs)} | {meets_target(epochs)} |"
        )
    return rows


def epoch_table(seed: dict[str, list[dict]], runs: dict[str, dict]) -> list[str]:
    sources = {**seed, **{label: run["epochs"] for label, run in runs.items()}}
    rows = ["| epoch | run | loss | train acc | test acc | time (s) |", "|---|---|---|---|---|---|"]
    last_epoch = max(len(epochs) for epochs in sources.values())
    for epoch in range(1, last_epoch + 1):
        for label, epochs in sources.items():
            if epoch <= len(epochs):
                record = epochs[epoch - 1]
                rows.append(
                    f"| {epoch} | {label} | {record['loss']:.4f} | {record['train_acc']:.3f} | "
                    f"{record['test_acc']:.3f} | {record['time_sec']:.1f} |"
                )
    return rows


def plan_backends(run: dict) -> set[str]:
    """The backends tritonbn's dispatcher chose for the run's BatchNorm layers, training and eval."""
    return {plan[mode]["backend"] for plan in run["dispatch"].values() for mode in ("train", "eval")}


def runs_torch_kernels(run: dict) -> bool:
    """Whether every BatchNorm call of the run was PyTorch's own kernel: torch.nn's modules, or
    tritonbn's whose dispatcher chose the torch backend throughout."""
    return run["config"]["bn"] == "torch" or plan_backends(run) == {"torch"}


def coinciding(curves: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[list[str]]]:
    """``curves`` with runs of identical loss and accuracies at every epoch merged into one entry
    labelled by all their names, and the merged groups."""
    groups: dict[tuple, list[str]] = {}
    for label, epochs in curves.items():
        key = tuple((r["epoch"], r["loss"], r["train_acc"], r["test_acc"]) for r in epochs)
        groups.setdefault(key, []).append(label)
    merged = {" = ".join(labels): curves[labels[0]] for labels in groups.values()}
    return merged, [labels for labels in groups.values() if len(labels) > 1]


def dispatch_section(runs: dict[str, dict]) -> list[str]:
    lines = []
    for label, run in runs.items():
        plans = run["dispatch"]
        if run["config"]["bn"] == "torch":
            lines += [
                f"- **{label}**: torch.nn's own BatchNorm modules; tritonbn's dispatcher is not involved.",
                "",
            ]
            continue
        backends = sorted(plan_backends(run))
        kernels = sorted(
            {
                str(plan[mode]["kernel"])
                for plan in plans.values()
                for mode in ("train", "eval")
                if plan[mode]["kernel"] is not None
            }
        )
        summary = f"backend {', '.join(backends)}"
        if kernels:
            summary += f", Triton kernel plans {', '.join(kernels)}"
        if world_size(run) > 1:
            source = (
                f"on each BatchNorm input of one process's share of a training batch; in training "
                f"the {world_size(run)} processes' SyncBatchNorm layers take their synchronized "
                "path, which the dispatcher does not choose"
            )
        else:
            source = "`tritonbn.explain` on each BatchNorm input of one training batch"
        lines.append(f"- **{label}** ({run['device']['type']}): {summary}. Layer by layer ({source}):")
        lines.append("")
        for name, plan in plans.items():
            lines.append(
                f"  - layer `net[{name}]` ({plan['module']}, input {tuple(plan['input_shape'])}): "
                f"training → {plan['train']['backend']}"
                + (f"/{plan['train']['kernel']}" if plan["train"]["kernel"] else "")
                + f", eval → {plan['eval']['backend']}"
                + (f"/{plan['eval']['kernel']}" if plan["eval"]["kernel"] else "")
            )
        first = next(iter(plans.values()))
        lines += [
            "",
            "  What the record says of the first layer in training mode:",
            "",
            "  ```text",
            *(f"  {text}" for text in first["train"]["explain"].splitlines()),
            "  ```",
            "",
        ]
    return lines


def setup_options(run: dict) -> dict[str, object]:
    """How a run's BatchNorm was set up: its --bn, --fuse and number of processes."""
    return {"bn": run["config"]["bn"], "fuse": bool(run["config"].get("fuse")), "processes": world_size(run)}


def setup(run: dict) -> str:
    """``setup_options`` as the options that give them."""
    options = setup_options(run)
    parts = [f"--bn {options['bn']}"]
    if options["fuse"]:
        parts.append("--fuse")
    if options["processes"] > 1:
        parts.append(f"--distributed over {options['processes']} processes")
    return " ".join(parts)


def identity_section(runs: dict[str, dict]) -> list[str]:
    """Pairs of runs that differ in one aspect of the BatchNorm set-up alone (--bn, --fuse or
    --distributed): are their weights equal after every epoch?"""
    lines = []
    labels = list(runs)
    varied = {"bn", "fuse"}
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            ra, rb = runs[a], runs[b]
            same_setup = {k: v for k, v in ra["config"].items() if k not in varied} == {
                k: v for k, v in rb["config"].items() if k not in varied
            } and ra["device"]["type"] == rb["device"]["type"]
            differences = [key for key, value in setup_options(ra).items() if setup_options(rb)[key] != value]
            if not same_setup or len(differences) != 1:
                continue
            equal = [
                x["weights_sha256"] == y["weights_sha256"]
                for x, y in zip(ra["epochs"], rb["epochs"], strict=False)
            ]
            verdict = (
                "identical after every epoch (same SHA-256 of the state_dict)"
                if all(equal)
                else f"different from epoch {equal.index(False) + 1} on"
            )
            note = ""
            if all(equal) and runs_torch_kernels(ra) and runs_torch_kernels(rb):
                note = (
                    " Expected by construction: on the CPU both ran PyTorch's own batch_norm (and "
                    "sigmoid), so this shows only that tritonbn's module layer adds no arithmetic of its "
                    "own, not that its Triton kernels match torch; `tests/test_train.py` compares those "
                    "with torch.nn's BatchNorm to float32 tolerance."
                )
            lines.append(
                f"- {a} and {b} (same seed and options, `{setup(ra)}` vs `{setup(rb)}`): "
                f"weights {verdict}.{note}"
            )
    return lines


def distributed_section(runs: dict[str, dict]) -> list[str]:
    """For each distributed run and its single-process twin (same options otherwise): the largest
    per-epoch differences of loss and accuracies."""
    lines = []
    for label, run in runs.items():
        if world_size(run) == 1:
            continue
        for twin_label, twin in runs.items():
            if (
                world_size(twin) == 1
                and twin["config"] == run["config"]
                and twin["device"]["type"] == run["device"]["type"]
            ):
                pairs = list(zip(run["epochs"], twin["epochs"], strict=False))
                loss = max(abs(a["loss"] - b["loss"]) for a, b in pairs)
                train = max(abs(a["train_acc"] - b["train_acc"]) for a, b in pairs)
                test = max(abs(a["test_acc"] - b["test_acc"]) for a, b in pairs)
                lines.append(
                    f"- {label} against {twin_label}: loss within {loss:.4f}, train acc within "
                    f"{train:.4f}, test acc within {test:.4f} over {len(pairs)} epochs."
                )
    return lines


def render(runs: dict[str, dict]) -> str:
    seed = {label: parse_seed(text) for label, text in SEED_OUTPUT.items()}
    on_torch_kernels = [
        label
        for label, run in runs.items()
        if run["config"]["bn"] == "tritonbn"
        and run["device"]["type"] == "cpu"
        and plan_backends(run) == {"torch"}
    ]
    out = [
        "# Reproduction: LeNet with batch normalization on Fashion-MNIST",
        "",
        "<!-- generated by docs/render_reproduction.py from docs/reproduction/*/metrics.json; "
        "do not edit by hand -->",
        "",
        f"The seed experiment ({SEED_SOURCE}) trains a LeNet with batch normalization after each "
        "convolution and hidden linear layer on Fashion-MNIST: Adam, learning rate 0.001, batch 256, "
        "5 epochs, cross-entropy loss. `tritonbn-train` repeats it with the same network, protocol "
        "and print-out; this page sets its runs beside the notebook's two print-outs.",
        "",
        "## Runs",
        "",
    ]
    for label, run in runs.items():
        versions = run["versions"]
        out.append(
            f"- **{label}**: `{command(run)}` on {device_text(run)}; torch {versions['torch']}, "
            f"triton {versions['triton']}, tritonbn {versions['tritonbn']}; "
            f"{run['data']['train_images']} training and {run['data']['test_images']} test images."
        )
    out += [
        "",
        "## Summary",
        "",
        f"The bar for `make train`: after {TARGET['epochs']} epochs, train acc ≥ "
        f"{TARGET['train_acc']} and test acc ≥ {TARGET['test_acc']}.",
        "",
        *summary_table(seed, runs),
        "",
    ]
    identical = identity_section(runs)
    if identical:
        out += ["Same network and seed, different BatchNorm set-ups:", "", *identical, ""]
    distributed = distributed_section(runs)
    if distributed:
        out += [
            "A distributed run adds each batch's gradients over its processes in another order "
            "than one process does, so its weights are not bit-identical to the single-process "
            "run's; how far its numbers moved:",
            "",
            *distributed,
            "",
        ]
    out += ["## Which BatchNorm code ran", ""]
    if on_torch_kernels:
        out += [
            "On a CPU, tritonbn's modules do not run Triton kernels: the dispatcher hands every call "
            "to PyTorch's own `batch_norm` (the Triton kernels need a CUDA device; Triton's interpreter "
            f"serves the tests only). So {', '.join(on_torch_kernels)} measured the training script and "
            "tritonbn's module layer around torch's kernel, not tritonbn's kernels.",
            "",
        ]
    out += [
        *dispatch_section(runs),
        "## Per-epoch results",
        "",
        "The runs' lines as `tritonbn-train` printed them:",
        "",
    ]
    for label, run in runs.items():
        out += [
            f"{label}:",
            "",
            "```text",
            f"training on {run['device']['type']}",
            *(epoch_line(record) for record in run["epochs"]),
            "```",
            "",
        ]
    for label, text in SEED_OUTPUT.items():
        out += [f"{label} (quoted from the notebook):", "", "```text", text.rstrip(), "```", ""]
    out += ["All of them epoch by epoch:", "", *epoch_table(seed, runs), ""]
    out += [
        "## Time per epoch",
        "",
        "Wall time of one epoch: training pass plus evaluation on the test images. The notebook's "
        "times come from a CUDA GPU and d2l's DataLoader pipeline; they are not comparable with CPU "
        "times. The CPU here is shared with other work, so the 1-minute load average at the end of "
        "each epoch is listed.",
        "",
    ]
    cpu_runs = [label for label, run in runs.items() if run["device"]["type"] == "cpu"]
    if len(cpu_runs) > 1:
        spreads = ", ".join(f"{label} {time_range(runs[label]['epochs'])}" for label in cpu_runs)
        out += [
            f"Epoch times within one CPU run ranged widely ({spreads}): the same work at different "
            "moments of contention. Differences between the CPU runs therefore say little about their "
            "BatchNorm choice, all the more where the dispatch section shows the same torch kernels "
            "underneath.",
            "",
        ]
    out += ["| run | epoch | train (s) | eval (s) | total (s) | load average |", "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        for record in run["epochs"]:
            load = record.get("load_avg_1min")
            out.append(
                f"| {label} | {record['epoch']} | {record['train_time_sec']:.1f} | "
                f"{record['eval_time_sec']:.1f} | {record['time_sec']:.1f} | "
                f"{'n/a' if load is None else f'{load:.2f}'} |"
            )
    curves, merged = coinciding({**{label: run["epochs"] for label, run in runs.items()}, **seed})
    out += [
        "",
        "## Curves",
        "",
        f"![loss and accuracy per epoch]({FIGURE.relative_to(DOCS).as_posix()})",
        "",
        "Left: training loss; right: train accuracy (solid) and test accuracy (dashed); one colour a "
        "run. The notebook's runs are drawn from its quoted print-out.",
    ]
    for labels in merged:
        out[-1] += (
            f" {', '.join(labels[:-1])} and {labels[-1]} have the same loss and accuracies at every "
            "epoch, so they are drawn as one line."
        )
    out.append("")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, FIGURE, "LeNet with batch normalization on Fashion-MNIST")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs",
        nargs="*",
        type=Path,
        help=f"run folders with a metrics.json (default: every folder under {RUNS})",
    )
    args = parser.parse_args(argv)
    folders = args.runs or sorted(path.parent for path in RUNS.glob("*/metrics.json"))
    page = render(load_runs(folders))
    PAGE.write_text(page)
    print(f"wrote {PAGE} and {FIGURE} from {len(folders)} runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
