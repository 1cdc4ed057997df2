"""bench/report.py's verdicts on synthetic results documents: a GPU target is judged on every case
the session planned (a case that failed or was not reached leaves it not judged, unless the
measured ones already fail it), older files without a plan are judged on what was measured and say
so, and the fused-activation, epoch and bandwidth targets follow their rules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # the bench folder is not a package: found through sys.path

LENET = ((256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (256, 84))
RESNET = ((32, 64, 112, 112), (32, 256, 56, 56))
FWD_BWD = "forward+backward"


def entry(shape, backend, pass_name=FWD_BWD, family="lenet", layout="contiguous", dtype="float32") -> dict:
    """A planned BatchNorm benchmark, as bench/conftest.py writes it."""
    return {
        "pass": pass_name,
        "shape": list(shape),
        "dtype": dtype,
        "layout": layout,
        "family": family,
        "backend": backend,
    }


def bench(planned_entry: dict, ms: float, **extra: object) -> dict:
    """A timed benchmark of the planned entry, in pytest-benchmark's JSON."""
    e = planned_entry
    group = f"{e['pass']} {report.shape_text(e['shape'])} {e['dtype']} {e['layout']}"
    return {
        "name": f"test_batch_norm[{group}-{e['backend']}]",
        "group": group,
        "extra_info": {**e, "plan": None, "ms": ms, "ms_q1": ms, "ms_q3": ms, **extra},
    }


def planned_pair(shape, **where: object) -> list[dict]:
    """tritonbn and torch planned on one case."""
    return [entry(shape, "tritonbn", **where), entry(shape, "torch", **where)]


def timed_pair(shape, speedup: float, **where: object) -> list[dict]:
    """tritonbn and torch timed on one case, tritonbn ``speedup`` times faster."""
    return [bench(entry(shape, "tritonbn", **where), 1.0), bench(entry(shape, "torch", **where), speedup)]


def gpu_run(benchmarks: list[dict], planned: list[dict] | None, **document: object) -> dict:
    """A GPU results document with its records, speedups added as bench/conftest.py does."""
    report.add_speedups(benchmarks)
    data = {
        "schema": report.SCHEMA,
        "machine_info": {"tritonbn": {"device_type": "cuda", "device_name": "a GPU", "copy_gbps": 4000.0}},
        "benchmarks": benchmarks,
        **document,
    }
    if planned is not None:
        data["planned"] = planned
    return report.with_records(data)


def target(run: dict, starts: str) -> report.Target:
    (found,) = [t for t in report.targets(run) if t.name.startswith(starts)]
    return found


def lenet_target(run: dict) -> report.Target:
    return target(run, "forward+backward float32, every LeNet layer")


def test_one_lenet_layer_measured_of_four_planned_is_not_judged():
    planned = [e for shape in LENET for e in planned_pair(shape)]
    run = gpu_run(timed_pair(LENET[0], 1.5), planned)
    verdict = lenet_target(run)
    assert verdict.met is None
    assert "1 of 4 cases measured" in verdict.value
    for shape in LENET[1:]:
        assert f"{report.shape_text(shape)} contiguous" in verdict.detail
    assert "missing" in verdict.detail
    assert "| not judged |" in report.targets_table([verdict])


def test_a_measured_case_below_the_target_is_not_met_even_with_cases_missing():
    planned = [e for shape in LENET for e in planned_pair(shape)]
    run = gpu_run([*timed_pair(LENET[0], 1.5), *timed_pair(LENET[1], 0.8)], planned)
    verdict = lenet_target(run)
    assert verdict.met is False
    assert verdict.value == "min 0.80x"
    assert "2 of 4 cases measured" in verdict.detail
    assert "256x120 contiguous" in verdict.detail and "256x84 contiguous" in verdict.detail


def test_every_planned_case_measured_and_fast_enough_is_met():
    planned = [e for shape in LENET for e in planned_pair(shape)]
    run = gpu_run([b for shape in LENET for b in timed_pair(shape, 1.2)], planned)
    verdict = lenet_target(run)
    assert verdict.met is True
    assert verdict.value == "min 1.20x"
    assert "missing" not in verdict.detail and report.NO_PLAN not in verdict.detail


def test_the_lenet_target_shows_the_wall_clock_and_graph_speedups_where_timed():
    planned = [e for shape in LENET for e in planned_pair(shape)]
    timed = []
    for shape in LENET:
        timed.append(bench(entry(shape, "tritonbn"), 1.0, wall_ms=2.0, cudagraph_ms=0.5))
        timed.append(bench(entry(shape, "torch"), 0.8, wall_ms=3.0, cudagraph_ms=1.0))
    verdict = lenet_target(gpu_run(timed, planned))
    # The verdict stays the device events'; the details add the other two, case by case.
    assert verdict.met is False and verdict.value == "min 0.80x"
    assert verdict.detail.endswith("; wall clock: 1.50, 1.50, 1.50, 1.50; CUDA graph: 2.00, 2.00, 2.00, 2.00")
    without = lenet_target(gpu_run([b for shape in LENET for b in timed_pair(shape, 1.2)], planned))
    assert "wall clock" not in without.detail and "CUDA graph" not in without.detail


def test_a_case_planned_without_torch_is_not_expected():
    # Its speedup needs torch's time: a plan that left torch out cannot ask for it.
    planned = [e for shape in LENET for e in planned_pair(shape)]
    planned = [e for e in planned if not (e["shape"] == list(LENET[3]) and e["backend"] == "torch")]
    run = gpu_run([b for shape in LENET[:3] for b in timed_pair(shape, 1.2)], planned)
    assert lenet_target(run).met is True


def test_a_file_without_a_plan_is_judged_on_what_was_measured_and_says_so():
    run = gpu_run(timed_pair(LENET[0], 1.5), planned=None)
    verdict = lenet_target(run)
    assert verdict.met is True
    assert report.NO_PLAN in verdict.detail


def test_the_geometric_mean_with_cases_missing_is_not_judged_either_way():
    # The missing cases could pull the mean up or down: a partial mean settles nothing.
    planned = [e for shape in RESNET for e in planned_pair(shape, family="resnet")]
    for speedup in (1.0, 2.0):
        run = gpu_run(timed_pair(RESNET[0], speedup, family="resnet"), planned)
        verdict = target(run, "forward+backward float32, geometric mean")
        assert verdict.met is None
        assert "1 of 2 cases measured" in verdict.value
        assert "32x256x56x56 contiguous" in verdict.detail
    complete = gpu_run([b for shape in RESNET for b in timed_pair(shape, 1.5, family="resnet")], planned)
    assert target(complete, "forward+backward float32, geometric mean").met is True


def test_a_target_no_planned_case_belongs_to_is_not_judged():
    planned = [e for shape in LENET for e in planned_pair(shape)]
    # The LeNet convolution layers are 4-D: only they are its cases.
    run_4d = gpu_run([b for shape in LENET for b in timed_pair(shape, 1.5)], planned)
    assert target(run_4d, "forward+backward float32, geometric mean").detail == "2 cases"
    only_2d = gpu_run([], [e for shape in LENET[2:] for e in planned_pair(shape)])
    assert target(only_2d, "forward+backward float32, geometric mean").value == "not planned"


def activation_entry(shape, activation: str, variant: str) -> dict:
    return {"suite": "activation", "shape": list(shape), "activation": activation, "variant": variant}


def activation_bench(shape, activation: str, variant: str, ms: float) -> dict:
    return {
        "name": f"test_fused_activation[{report.shape_text(shape)}-{activation}-{variant}]",
        "group": f"fused activation {report.shape_text(shape)} {activation}",
        "extra_info": {
            **activation_entry(shape, activation, variant),
            "dtype": "float32",
            "ms": ms,
            "ms_q1": ms,
            "ms_q3": ms,
            "held_bytes": None,
        },
    }


def fused_target(run: dict) -> report.Target:
    return target(run, "fused BatchNorm + activation")


def test_the_fused_activation_target_is_judged_on_its_slowest_case():
    cases = [(LENET[0], "relu", 2.5), (LENET[2], "sigmoid", 2.0)]
    planned = [activation_entry(s, a, v) for s, a, _ in cases for v in ("fused", "unfused")]
    timed = [
        b
        for s, a, r in cases
        for b in (activation_bench(s, a, "fused", 1.0), activation_bench(s, a, "unfused", r))
    ]
    verdict = fused_target(gpu_run(timed, planned))
    assert verdict.met is True and verdict.value == "min 2.00x"
    assert verdict.threshold == f">= {report.FUSED_TARGET}x each"
    assert "geomean 2.24x" in verdict.detail and "256x120 sigmoid: 2.00x" in verdict.detail

    slow = [*timed[:3], activation_bench(LENET[2], "sigmoid", "unfused", 1.5)]
    assert fused_target(gpu_run(slow, planned)).met is False


def test_the_fused_activation_target_waits_for_every_planned_case():
    planned = [
        activation_entry(s, a, v)
        for s, a in ((LENET[0], "relu"), (LENET[2], "silu"))
        for v in ("fused", "unfused")
    ]
    # The second case's fused variant failed: its pair is incomplete.
    timed = [
        activation_bench(LENET[0], "relu", "fused", 1.0),
        activation_bench(LENET[0], "relu", "unfused", 3.0),
        activation_bench(LENET[2], "silu", "unfused", 3.0),
    ]
    verdict = fused_target(gpu_run(timed, planned))
    assert verdict.met is None
    assert "1 of 2 cases measured" in verdict.value and "256x120 silu" in verdict.detail
    assert fused_target(gpu_run([], None)).value == "not measured"


def epoch_target(run: dict) -> report.Target:
    return target(run, "LeNet training epoch, --bn tritonbn")


def trained(**fields: object) -> dict:
    return {"tritonbn": {"status": "ok", "epochs": 5, "first_epoch_sec": 9.0, **fields}}


def test_the_epoch_target_takes_the_later_epochs_or_else_says_it_took_the_first():
    verdict = epoch_target(gpu_run([], None, training=trained(later_epoch_sec=0.8)))
    assert verdict.met is True and verdict.value == "0.80 s"
    assert verdict.threshold == f"<= {report.EPOCH_TARGET_SEC:g} s"
    assert epoch_target(gpu_run([], None, training=trained(later_epoch_sec=1.2))).met is False

    only_first = epoch_target(gpu_run([], None, training=trained(epochs=1, later_epoch_sec=None)))
    assert only_first.met is False and only_first.value == "9.00 s" and "first epoch" in only_first.detail

    assert epoch_target(gpu_run([], None)).met is None
    failed = epoch_target(gpu_run([], None, training={"tritonbn": {"status": "failed (exit status 1)"}}))
    assert failed.met is None and "failed (exit status 1)" in failed.detail


# 32x64x128x128 float32 is 128 MiB, 32x64x112x112 98 MiB: with a 70 MiB L2 only the first cannot
# stay in it between passes (1.5 L2s: 105 MiB); both have more than 2^22 elements.
BIG, MIDDLE = (32, 64, 128, 128), (32, 64, 112, 112)


def bandwidth_run(l2_mib: float | None, planned: bool = True) -> dict:
    info = {"device_type": "cuda", "copy_gbps": 4000.0}
    if l2_mib is not None:
        info["l2_cache_mib"] = l2_mib
    cases = [
        entry(shape, "tritonbn", pass_name=p, family="resnet")
        for shape in (BIG, MIDDLE, LENET[0])
        for p in ("forward", "backward")
    ]
    share = {BIG: 90.0, MIDDLE: 50.0, LENET[0]: 10.0}
    benchmarks = [bench(e, 1.0, pct_of_copy=share[tuple(e["shape"])]) for e in cases]
    data = {"machine_info": {"tritonbn": info}, "benchmarks": benchmarks}
    if planned:
        data["planned"] = cases
    return report.with_records(data)


def test_large_inputs_are_those_that_cannot_stay_in_l2_when_its_size_is_known():
    verdict = target(bandwidth_run(70.0), "float32 inputs of")
    assert verdict.name.startswith("float32 inputs of >= 1.5x L2 (105 MiB)")
    assert verdict.met is True and verdict.value == "min 90%"

    # Without the L2 size: 2^22 elements, which takes the 98 MiB input too.
    fallback = target(bandwidth_run(None), "float32 inputs of")
    assert fallback.name.startswith("float32 inputs of >= 2^22 elements")
    assert fallback.met is False and fallback.value == "min 50%"

    # An L2 of 100 MiB leaves no planned case large: not judged, and the largest one is named.
    none_large = target(bandwidth_run(100.0), "float32 inputs of")
    assert none_large.met is None and none_large.value == "not planned"
    assert "the largest: 128 MiB" in none_large.detail


def test_the_bandwidth_target_waits_for_every_planned_pass():
    run = bandwidth_run(70.0)
    run["records"] = [r for r in run["records"] if r["pass"] != "backward"]
    verdict = target(run, "float32 inputs of")
    assert verdict.met is None and "1 of 2 cases measured" in verdict.value
    assert "backward 32x64x128x128 contiguous" in verdict.detail
    assert report.NO_PLAN in target(bandwidth_run(70.0, planned=False), "float32 inputs of").detail


def test_a_gpu_run_judges_the_five_targets():
    names = [t.name for t in report.targets(gpu_run([], []))]
    assert len(names) == 5
    assert all(t.met is None for t in report.targets(gpu_run([], [])))


def test_the_headline_marks_a_host_bound_side():
    shape = (256, 120)
    run = gpu_run(
        [
            bench(entry(shape, "tritonbn"), 0.010, wall_ms=0.012, cudagraph_ms=0.010),
            bench(entry(shape, "torch"), 0.030, wall_ms=0.040, cudagraph_ms=0.016),
            *timed_pair((256, 84), 1.2),  # neither time measured
        ],
        None,
    )
    rows = report.headline_table(run["records"]).splitlines()
    assert rows[0].endswith("| wall ÷ CUDA graph (tritonbn / torch) |")
    assert rows[2].endswith("| 1.2 / 2.5 host |")
    assert rows[3].endswith("| — |")
    assert report.host_bound(run["records"][0]) is False
    assert report.host_bound(run["records"][1]) is True
    assert report.host_bound(run["records"][2]) is None


def test_the_cpu_target_is_unchanged_by_a_plan():
    paired = {
        "name": "test_cpu_fallback_against_torch[256x120]",
        "group": "cpu fallback 256x120",
        "extra_info": {
            "suite": "fallback",
            "pass": FWD_BWD,
            "shape": [256, 120],
            "dtype": "float32",
            "layout": "contiguous",
            "ratio": 1.05,
            "ms": 1.0,
        },
    }
    run = report.with_records(
        {"machine_info": {"tritonbn": {"device_type": "cpu"}}, "benchmarks": [paired], "planned": []}
    )
    (verdict,) = report.targets(run)
    assert verdict.met is True and verdict.value == "max +5.0%" and report.NO_PLAN not in verdict.detail


def test_report_imports_only_the_standard_library():
    # gpu_check.py's parent process imports it and must not need torch or tritonbn.
    tree = ast.parse(Path(report.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= set(sys.stdlib_module_names)


def test_the_page_shows_a_gpu_checks_own_host_times_before_the_files(tmp_path):
    import json
    import shutil

    import render_benchmarks

    results = tmp_path / "results"
    (results / "host-overhead").mkdir(parents=True)
    gpu = next(iter(sorted((Path(__file__).parent / "results").glob("h200-*.json"))))
    shutil.copy(gpu, results / gpu.name)
    standin = next(iter(sorted((Path(__file__).parent / "results" / "host-overhead").glob("*.json"))))
    shutil.copy(standin, results / "host-overhead" / standin.name)
    out = tmp_path / "benchmarks.md"
    assert render_benchmarks.main(["--results", str(results), "--out", str(out)]) == 0
    page = out.read_text()
    host = page[page.index("## Host time per layer") :]
    check = json.loads(gpu.read_text())
    sources = [line.split("`")[1] for line in host.splitlines() if line.startswith("From `")]
    expected = [str(results / gpu.name)] * sum(
        1 for key in ("host_overhead", "host_overhead_compiled") if check[key]
    )
    assert sources == [*expected, str(results / "host-overhead" / standin.name)]
    first_layer = check["host_overhead"]["layers"][0]
    assert f"| {first_layer['layer']} |" in host
