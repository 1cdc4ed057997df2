"""Reading benchmark results (bench/results/*.json) and turning them into verdicts and tables.

Shared by the pytest hooks (speedups written into the JSON), ``gpu_check.py`` (its summary) and
``render_benchmarks.py`` (docs/benchmarks.md). The schema is described in bench/results/README.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

SCHEMA = "tritonbn-bench/1"
PASS_ORDER = ("forward+backward", "forward", "backward", "eval")
# An input counts as large for the bandwidth target when it cannot stay in the L2 cache between the
# passes of a step: at least L2_FACTOR times the L2 size (machine_info's l2_cache_mib; a pass that
# streams 1.5 L2s through it finds little of the previous pass there). Where the results do not
# record the L2 size (older files), at least 2^22 elements (16 MiB in float32).
L2_FACTOR = 1.5
LARGE_NUMEL = 2**22
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SPEEDUP_TARGET = 1.3
LENET_TARGET = 1.0
COPY_TARGET_PCT = 85.0
FUSED_TARGET = 1.8
EPOCH_TARGET_SEC = 1.0
CPU_OVERHEAD_TARGET_PCT = 10.0
NO_PLAN = "(no plan recorded: judged on what was measured)"
# A case is host-bound where its wall-clock time per call (a loop of calls, synchronized once) is
# more than HOST_BOUND_FACTOR times its time replayed from a CUDA graph (no host work at all):
# the GPU waited for the host's launches. Both run with a warm L2, unlike the device time, whose
# runs each follow an L2 flush.
HOST_BOUND_FACTOR = 1.5


def add_speedups(benchmarks: list[dict]) -> None:
    """Set ``extra_info["speedup_vs_torch"]`` of every timed benchmark: torch's median device time
    in the same group divided by its own (None where the group has no timed torch entry); and
    likewise ``wall_speedup_vs_torch`` and ``cudagraph_speedup_vs_torch`` from the wall-clock and
    CUDA-graph times where they were measured (CUDA)."""
    for field, speedup in (
        ("ms", "speedup_vs_torch"),
        ("wall_ms", "wall_speedup_vs_torch"),
        ("cudagraph_ms", "cudagraph_speedup_vs_torch"),
    ):
        torch_ms = {
            bench["group"]: bench["extra_info"][field]
            for bench in benchmarks
            if bench["extra_info"].get("backend") == "torch" and bench["extra_info"].get(field)
        }
        for bench in benchmarks:
            info = bench["extra_info"]
            base = torch_ms.get(bench["group"])
            info[speedup] = base / info[field] if base and info.get(field) else None


def with_records(data: dict) -> dict:
    """``data`` (a results document) with ``records`` added: the extra_info of every timed
    batch-norm benchmark, with its group and name; ``activation_records`` holds those of the fused
    activation suite (extra_info ``suite`` = ``"activation"``), ``fallback_records`` those of the
    CPU fallback's paired timing (``suite`` = ``"fallback"``)."""
    timed = [
        {**bench["extra_info"], "group": bench["group"], "name": bench["name"]}
        for bench in data.get("benchmarks", [])
        if bench.get("extra_info", {}).get("ms") is not None
    ]
    data["records"] = [record for record in timed if "suite" not in record]
    data["activation_records"] = select(timed, suite="activation")
    data["fallback_records"] = select(timed, suite="fallback")
    return data


def load(path: Path) -> dict:
    """One results file, with its ``path`` and ``records`` (see :func:`with_records`)."""
    return {**with_records(json.loads(path.read_text())), "path": path}


def load_all(directory: Path) -> list[dict]:
    """Every results file in ``directory``: GPU runs first, newest first within a kind."""
    runs = [load(path) for path in sorted(directory.glob("*.json"))]
    runs.sort(key=lambda run: run.get("datetime", ""), reverse=True)
    runs.sort(key=lambda run: not is_gpu(run))
    return runs


def machine(run: dict) -> dict:
    """The tritonbn part of a run's machine_info (device, versions, copy bandwidth, timer)."""
    return run.get("machine_info", {}).get("tritonbn", {})


def is_gpu(run: dict) -> bool:
    return machine(run).get("device_type") == "cuda"


def shape_text(shape: Iterable[int]) -> str:
    return "x".join(map(str, shape))


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def select(records: list[dict], **where: object) -> list[dict]:
    """The records whose fields equal every ``where`` value."""
    return [record for record in records if all(record.get(key) == value for key, value in where.items())]


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: what it asks, what was measured, and whether it is met: True
    (met), False (NOT met) or None (not judged: nothing to judge it by, or some of the cases it
    needs were planned but not measured and those measured do not settle it)."""

    name: str
    threshold: str
    value: str
    met: bool | None
    detail: str = ""


def of_pass(records: list[dict], pass_name: str) -> list[dict]:
    return [record for record in records if record["pass"] == pass_name]


def _per_case(records: list[dict], field: str, fmt: str) -> str:
    return ", ".join(f"{shape_text(r['shape'])} {r['layout']}: {format(r[field], fmt)}" for r in records)


def _judge(
    name: str, asks: str, records: list[dict], measure: Callable[[list[dict]], tuple[str, bool, str]]
) -> Target:
    """``measure(records)`` gives (measured, met, details); no records means not measured."""
    if not records:
        return Target(name, asks, "not measured", None)
    return Target(name, asks, *measure(records))


def planned(run: dict) -> list[dict] | None:
    """The benchmarks the run's session planned (``planned``, written by bench/conftest.py); None
    where the results record no plan (files older than the key, or a check whose benchmarks never
    wrote their JSON)."""
    return run.get("planned") or None


def case_key(entry: dict) -> tuple:
    """What tells a BatchNorm benchmark's case apart, in a planned entry as in a record."""
    return (entry["pass"], tuple(entry["shape"]), entry["dtype"], entry["layout"])


def activation_key(entry: dict) -> tuple:
    """What tells a fused-activation case apart (its fused and unfused variants share it)."""
    return (tuple(entry["shape"]), entry["activation"])


def _judge_planned(
    name: str,
    asks: str,
    expected: list[tuple] | None,
    measured: dict[tuple, dict],
    measure: Callable[[list[dict]], tuple[str, bool, str]],
    label: Callable[[tuple], str],
    one_case_decides: bool,
) -> Target:
    """Judge a target on the cases it needs. ``expected``: the keys of the planned cases it needs
    (None: no plan recorded, so it is judged on whatever ``measured`` holds, and says so);
    ``measured``: the usable record of each case measured, by key; ``label`` names a missing case.

    Every expected case measured: ``measure`` decides. Some missing (failed, or not reached in the
    time budget): not judged, unless ``one_case_decides`` (a target every case must meet) and the
    measured ones already fail it: NOT met. Either way the value and details say how many of the
    cases were measured and name the missing ones."""
    if expected is None:
        if not measured:
            return Target(name, asks, "not measured", None)
        value, met, detail = measure(list(measured.values()))
        return Target(name, asks, value, met, f"{detail} {NO_PLAN}".strip())
    if not expected:
        return Target(name, asks, "not planned", None, "no planned benchmark is one of its cases")
    records = [measured[key] for key in expected if key in measured]
    missing = [key for key in expected if key not in measured]
    count = f"{len(records)} of {len(expected)} cases measured"
    if not missing:
        return Target(name, asks, *measure(records))
    lacking = "missing (failed or not reached): " + ", ".join(map(label, missing))
    if not records:
        return Target(name, asks, "not measured", None, f"{count}; {lacking}")
    value, met, detail = measure(records)
    if one_case_decides and not met:
        return Target(name, asks, value, False, f"{count}; {lacking}; {detail}")
    return Target(name, asks, f"{value} on {count}", None, f"{lacking}; {detail}")


def _case_label(key: tuple) -> str:
    return f"{shape_text(key[1])} {key[3]}"


def _pass_case_label(key: tuple) -> str:
    return f"{key[0]} {shape_text(key[1])} {key[3]}"


def _geomean_speedup(records: list[dict]) -> tuple[str, bool, str]:
    value = geomean([r["speedup_vs_torch"] for r in records])
    return f"{value:.2f}x", value >= SPEEDUP_TARGET, f"{len(records)} cases"


# Besides the device events, the other times of a CUDA run, in a target's details: on a small
# (host-bound) layer the events hold part of the host's time and move between runs (an H200's fc2
# measured 0.79x and 1.21x in two checks), the wall clock is what an eager caller waits for, and a
# CUDA graph's replay is the device's time alone.
OTHER_SPEEDUPS = (("wall_speedup_vs_torch", "wall clock"), ("cudagraph_speedup_vs_torch", "CUDA graph"))


def _slowest_speedup(records: list[dict]) -> tuple[str, bool, str]:
    worst = min(r["speedup_vs_torch"] for r in records)
    detail = _per_case(records, "speedup_vs_torch", ".2f")
    for field, label in OTHER_SPEEDUPS:
        if all(r.get(field) for r in records):
            detail += f"; {label}: " + ", ".join(format(r[field], ".2f") for r in records)
    return f"min {worst:.2f}x", worst >= LENET_TARGET, detail


def _lowest_copy_share(records: list[dict]) -> tuple[str, bool, str]:
    worst = min(r["pct_of_copy"] for r in records)
    per_pass = ", ".join(
        f"{name}: min {min(r['pct_of_copy'] for r in of_pass(records, name)):.0f}%"
        for name in PASS_ORDER
        if of_pass(records, name)
    )
    return f"min {worst:.0f}%", worst >= COPY_TARGET_PCT, per_pass


def _slowest_fusion(pairs: list[dict]) -> tuple[str, bool, str]:
    worst = min(p["ratio"] for p in pairs)
    mean = geomean([p["ratio"] for p in pairs])
    per_case = ", ".join(f"{shape_text(p['shape'])} {p['activation']}: {p['ratio']:.2f}x" for p in pairs)
    return f"min {worst:.2f}x", worst >= FUSED_TARGET, f"geomean {mean:.2f}x; {per_case}"


def _largest_overhead(records: list[dict]) -> tuple[str, bool, str]:
    for record in records:
        # A paired record has its ratio to torch; the others, a speedup over a separate timing.
        ratio = record["ratio"] if "ratio" in record else 1.0 / record["speedup_vs_torch"]
        record["overhead_pct"] = 100.0 * (ratio - 1.0)
    worst = max(r["overhead_pct"] for r in records)
    return f"max {worst:+.1f}%", worst <= CPU_OVERHEAD_TARGET_PCT, _per_case(records, "overhead_pct", "+.1f")


def x_bytes(entry: dict) -> int:
    """Bytes of a case's input x."""
    return math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]


def large_input(run: dict) -> tuple[str, Callable[[dict], bool]]:
    """What counts as a large input on the run's device (see L2_FACTOR): the rule in words, and
    the test of a planned entry or record."""
    l2_mib = machine(run).get("l2_cache_mib")
    if l2_mib:
        limit = L2_FACTOR * l2_mib * 2**20
        return f">= {L2_FACTOR}x L2 ({L2_FACTOR * l2_mib:g} MiB)", lambda entry: x_bytes(entry) >= limit
    return ">= 2^22 elements", lambda entry: math.prod(entry["shape"]) >= LARGE_NUMEL


def _tritonbn_cases(
    run: dict, keep: Callable[[dict], bool], field: str, with_torch: bool
) -> tuple[list[tuple] | None, dict[tuple, dict]]:
    """(expected, measured) of a target on tritonbn's own dispatch: the keys of the planned tritonbn
    cases ``keep`` selects (None where no plan is recorded; ``with_torch``: only those where torch
    was planned too), and by key the measured records ``keep`` selects that have ``field``."""
    plan = planned(run)
    expected = None
    if plan is not None:
        torch_cases = {case_key(e) for e in plan if e.get("backend") == "torch"}
        expected = [
            case_key(e)
            for e in plan
            if e.get("backend") == "tritonbn" and keep(e) and (not with_torch or case_key(e) in torch_cases)
        ]
    measured = {
        case_key(r): r
        for r in select(run["records"], backend="tritonbn")
        if r.get(field) is not None and keep(r)
    }
    return expected, measured


def _speedup_target(
    run: dict,
    name: str,
    asks: str,
    keep: Callable[[dict], bool],
    measure: Callable[[list[dict]], tuple[str, bool, str]],
    one_case_decides: bool,
) -> Target:
    """A target on tritonbn's speedup over torch in the cases ``keep`` selects: a planned tritonbn
    case counts only where torch was planned too (its speedup needs both)."""
    expected, measured = _tritonbn_cases(run, keep, "speedup_vs_torch", with_torch=True)
    return _judge_planned(name, asks, expected, measured, measure, _case_label, one_case_decides)


def _bandwidth_target(run: dict) -> Target:
    """Every pass of tritonbn on the large float32 inputs: the lowest share of copy bandwidth."""
    rule, large = large_input(run)

    def keep(entry: dict) -> bool:
        return entry["dtype"] == "float32" and large(entry)

    expected, measured = _tritonbn_cases(run, keep, "pct_of_copy", with_torch=False)
    verdict = _judge_planned(
        f"float32 inputs of {rule}, every pass: % of copy bandwidth",
        f">= {COPY_TARGET_PCT:.0f}%",
        expected,
        measured,
        _lowest_copy_share,
        _pass_case_label,
        one_case_decides=True,
    )
    plan = planned(run) or ()
    sizes = [x_bytes(e) for e in plan if e.get("backend") == "tritonbn" and e["dtype"] == "float32"]
    if expected == [] and sizes:
        detail = f"no planned float32 input is that large (the largest: {max(sizes) / 2**20:.0f} MiB)"
        verdict = replace(verdict, detail=detail)
    return verdict


def _fused_target(run: dict) -> Target:
    """Fused BatchNorm + activation against BatchNorm then the activation module, forward+backward:
    judged on every case (the slowest), the geometric mean shown beside it."""
    plan = planned(run)
    expected = None
    if plan is not None:
        variants: dict[tuple, set[str]] = {}
        for entry in select(plan, suite="activation"):
            variants.setdefault(activation_key(entry), set()).add(entry["variant"])
        expected = [key for key, found in variants.items() if {"fused", "unfused"} <= found]
    by_case: dict[tuple, dict[str, dict]] = {}
    for record in run.get("activation_records") or []:
        by_case.setdefault(activation_key(record), {})[record["variant"]] = record
    measured = {
        key: {
            "shape": list(key[0]),
            "activation": key[1],
            "ratio": found["unfused"]["ms"] / found["fused"]["ms"],
        }
        for key, found in by_case.items()
        if found.get("fused", {}).get("ms") and found.get("unfused", {}).get("ms")
    }
    return _judge_planned(
        "fused BatchNorm + activation, forward+backward: fused over unfused (BatchNorm then the "
        "activation module), every case",
        f">= {FUSED_TARGET}x each",
        expected,
        measured,
        _slowest_fusion,
        lambda key: f"{shape_text(key[0])} {key[1]}",
        one_case_decides=True,
    )


def _epoch_target(run: dict) -> Target:
    """The seed's LeNet training with ``--bn tritonbn``: the median time of the epochs after the
    first (which compiles the kernels), or the first where it was the only one."""
    name, asks = "LeNet training epoch, --bn tritonbn", f"<= {EPOCH_TARGET_SEC:g} s"
    trained = (run.get("training") or {}).get("tritonbn")
    if not trained or not trained.get("epochs"):
        return Target(name, asks, "not measured", None, f"run: {trained['status']}" if trained else "")
    seconds = trained.get("later_epoch_sec")
    if seconds is not None:
        how = f"median of epochs 2 to {trained['epochs']}"
    else:
        seconds = trained["first_epoch_sec"]
        how = "the first epoch (kernel compilation included): no later epoch ran"
    return Target(
        name, asks, f"{seconds:.2f} s", seconds <= EPOCH_TARGET_SEC, f"{how}; run: {trained['status']}"
    )


def targets(run: dict) -> list[Target]:
    """The issue's targets for a run, judged on tritonbn's automatic dispatch against torch native.

    On a GPU: the forward+backward speedups, the share of copy bandwidth on large inputs, the fused
    activation's speedup and the LeNet epoch time. Each is judged on every case the session
    planned (``planned``; see :func:`_judge_planned`), so that a case that failed or was not
    reached cannot leave a target met by default. On a CPU: the fallback's overhead (from the
    paired timing where the run has it: separate timings drift more than the overhead), judged on
    what was measured (the paired suite is not in ``planned``)."""
    if not is_gpu(run):
        auto = select(run["records"], backend="tritonbn", dtype="float32")
        auto = [r for r in auto if r.get("speedup_vs_torch")]
        lenet = select(of_pass(auto, "forward+backward"), family="lenet", layout="contiguous")
        paired = run.get("fallback_records") or []
        return [
            _judge(
                "CPU fallback, forward+backward float32, every LeNet layer: extra time over torch.nn"
                + (" (timed in pairs)" if paired else ""),
                f"<= {CPU_OVERHEAD_TARGET_PCT:.0f}%",
                paired or lenet,
                _largest_overhead,
            )
        ]

    def fwd_bwd_4d(entry: dict) -> bool:
        return (
            entry["pass"] == "forward+backward" and entry["dtype"] == "float32" and len(entry["shape"]) == 4
        )

    def lenet_layer(entry: dict) -> bool:
        return (
            entry["pass"] == "forward+backward"
            and entry["dtype"] == "float32"
            and entry["family"] == "lenet"
            and entry["layout"] == "contiguous"
        )

    return [
        _speedup_target(
            run,
            "forward+backward float32, geometric mean over the 4-D cases",
            f">= {SPEEDUP_TARGET}x",
            fwd_bwd_4d,
            _geomean_speedup,
            one_case_decides=False,
        ),
        _speedup_target(
            run,
            "forward+backward float32, every LeNet layer (contiguous)",
            f">= {LENET_TARGET}x each",
            lenet_layer,
            _slowest_speedup,
            one_case_decides=True,
        ),
        _bandwidth_target(run),
        _fused_target(run),
        _epoch_target(run),
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(items: list[Target]) -> str:
    verdict = {True: "met", False: "NOT met", None: "not judged"}
    return markdown_table(
        ["target", "asks", "measured", "verdict", "details"],
        [[t.name, t.threshold, t.value, verdict[t.met], t.detail] for t in items],
    )


def cell(record: dict | None) -> str:
    """'median ms ±half the interquartile range · speedup · % of copy' of one timed benchmark,
    '—' for none."""
    if record is None:
        return "—"
    spread = 50.0 * (record["ms_q3"] - record["ms_q1"]) / record["ms"]
    parts = [f"{record['ms']:.4g} ms ±{spread:.0f}%"]
    if record.get("speedup_vs_torch"):
        parts.append(f"{record['speedup_vs_torch']:.2f}x")
    if record.get("pct_of_copy") is not None:
        parts.append(f"{record['pct_of_copy']:.0f}%")
    return " · ".join(parts)


def shape_tables(records: list[dict]) -> str:
    """One table per shape: a row per (dtype, layout, backend), a column per pass."""
    sections = []
    for shape in dict.fromkeys(tuple(r["shape"]) for r in records):
        of_shape = [r for r in records if tuple(r["shape"]) == shape]
        rows = []
        for key in dict.fromkeys((r["dtype"], r["layout"], r["backend"]) for r in of_shape):
            dtype, layout, backend = key
            found = {r["pass"]: r for r in select(of_shape, dtype=dtype, layout=layout, backend=backend)}
            plans = sorted({str(r["plan"]) for r in found.values() if r.get("plan")})
            rows.append(
                [
                    dtype,
                    layout,
                    backend,
                    ", ".join(plans) or "—",
                    *(cell(found.get(name)) for name in PASS_ORDER),
                ]
            )
        sections.append(
            f"#### {shape_text(shape)} ({of_shape[0]['family']})\n\n"
            + markdown_table(["dtype", "layout", "backend", "plan", *PASS_ORDER], rows)
        )
    return "\n\n".join(sections)


def headline_table(records: list[dict]) -> str:
    """forward+backward float32 per case: tritonbn's plan and time against torch and torch.compile,
    and how much of each one's wall-clock time the host adds (``host_bound``)."""
    rows = []
    fwd_bwd = of_pass(select(records, dtype="float32"), "forward+backward")
    for group in dict.fromkeys(r["group"] for r in fwd_bwd):
        by_backend = {r["backend"]: r for r in select(fwd_bwd, group=group)}
        auto, native = by_backend.get("tritonbn"), by_backend.get("torch")
        compiled = by_backend.get("torch.compile")
        any_record = next(iter(by_backend.values()))
        rows.append(
            [
                f"{shape_text(any_record['shape'])} {any_record['layout']}",
                str(auto["plan"]) if auto else "—",
                f"{auto['ms']:.4g}" if auto else "—",
                f"{native['ms']:.4g}" if native else "—",
                _times(auto, "speedup_vs_torch"),
                _times(auto, "wall_speedup_vs_torch"),
                _times(auto, "cudagraph_speedup_vs_torch"),
                _times(compiled, "speedup_vs_torch"),
                f"{auto['pct_of_copy']:.0f}%" if auto and auto.get("pct_of_copy") is not None else "—",
                _host_cell(auto, native),
            ]
        )
    return markdown_table(
        [
            "case",
            "tritonbn plan",
            "tritonbn ms",
            "torch ms",
            "tritonbn speedup (device)",
            "(wall clock)",
            "(CUDA graph)",
            "torch.compile speedup",
            "tritonbn % of copy",
            "wall ÷ CUDA graph (tritonbn / torch)",
        ],
        rows,
    )


def host_bound(record: dict | None) -> bool | None:
    """Whether a CUDA record's wall-clock time is host-bound (see ``HOST_BOUND_FACTOR``); None
    where either time was not measured."""
    wall = record.get("wall_ms") if record else None
    graph = record.get("cudagraph_ms") if record else None
    if not wall or not graph:
        return None
    return wall > HOST_BOUND_FACTOR * graph


def _host_cell(auto: dict | None, native: dict | None) -> str:
    """``wall ÷ CUDA graph`` of tritonbn and torch, "host" after a host-bound one."""

    def side(record: dict | None) -> str:
        bound = host_bound(record)
        if bound is None:
            return "—"
        ratio = record["wall_ms"] / record["cudagraph_ms"]
        return f"{ratio:.1f} host" if bound else f"{ratio:.1f}"

    sides = (side(auto), side(native))
    return "—" if sides == ("—", "—") else " / ".join(sides)


def _times(record: dict | None, field: str) -> str:
    """A speedup cell: ``1.23x``, or ``—`` where it was not measured."""
    value = record.get(field) if record else None
    return f"{value:.2f}x" if value else "—"


def fallback_table(records: list[dict]) -> str:
    """The CPU fallback's paired timing, per case: each side's median time a call, and the
    median (and quartiles) of the pairs' ratios."""

    def extra(ratio: float) -> str:
        return f"{100 * (ratio - 1):+.1f}%"

    rows = [
        [
            shape_text(r["shape"]),
            f"{r['ms']:.4g}",
            f"{r['torch_ms']:.4g}",
            f"{extra(r['ratio'])} ({extra(r['ratio_q1'])} to {extra(r['ratio_q3'])})",
            str(r["pairs"]),
        ]
        for r in records
    ]
    return markdown_table(
        ["shape", "tritonbn ms", "torch.nn ms", "extra time: median of the pairs (quartiles)", "pairs"], rows
    )


def activation_table(records: list[dict]) -> str:
    """Fused BatchNorm + activation against BatchNorm then the activation module, per case:
    forward+backward time and the memory a training forward holds for the backward."""
    rows = []
    for group in dict.fromkeys(r["group"] for r in records):
        by_variant = {r["variant"]: r for r in select(records, group=group)}
        fused, unfused = by_variant.get("fused"), by_variant.get("unfused")
        any_record = next(iter(by_variant.values()))

        def mib(record: dict | None) -> str:
            held = None if record is None else record.get("held_bytes")
            return "—" if held is None else f"{held / 2**20:.1f}"

        rows.append(
            [
                shape_text(any_record["shape"]),
                any_record["activation"],
                f"{fused['ms']:.4g}" if fused else "—",
                f"{unfused['ms']:.4g}" if unfused else "—",
                f"{unfused['ms'] / fused['ms']:.2f}x" if fused and unfused else "—",
                mib(fused),
                mib(unfused),
            ]
        )
    return markdown_table(
        [
            "shape",
            "activation",
            "fused ms",
            "unfused ms",
            "fused speedup",
            "fused held MiB",
            "unfused held MiB",
        ],
        rows,
    )


def training_table(training: dict[str, dict]) -> str:
    """The LeNet training runs of a GPU check: status, final metrics and epoch times per --bn."""
    rows = []
    for bn, run in training.items():
        if run.get("epochs"):
            later = run.get("later_epoch_sec")
            rows.append(
                [
                    bn,
                    run["status"],
                    str(run["epochs"]),
                    f"{run['loss']:.4f}",
                    f"{run['train_acc']:.3f}",
                    f"{run['test_acc']:.3f}",
                    f"{run['first_epoch_sec']:.1f}",
                    "—" if later is None else f"{later:.1f}",
                ]
            )
        else:
            rows.append([bn, run["status"], *["—"] * 6])
    return markdown_table(
        [
            "--bn",
            "status",
            "epochs",
            "final loss",
            "train acc",
            "test acc",
            "first epoch s",
            "later epochs s (median)",
        ],
        rows,
    )
