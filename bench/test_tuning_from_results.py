"""bench/tuning_from_results.py: a GPU run's benchmark timings become a tuning table whose entries
take what ran fastest, torch included, and which the dispatcher then follows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import tuning_from_results

from tritonbn import dispatch, tune, tuning

RESULTS = Path(__file__).parent / "results"
GPU = {
    "device_type": "cuda",
    "device_name": "Fake GPU 9000",
    "capability": [9, 0],
    "sm_count": 132,
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "tritonbn": "0.1.0",
}


def _template() -> dict:
    """A timed BatchNorm-suite benchmark as the suite writes it (from a committed CPU run)."""
    run = json.loads(next(iter(sorted(RESULTS.glob("cpu-*.json")))).read_text())
    return next(bench for bench in run["benchmarks"] if "pass" in bench["extra_info"])


def gpu_run(tmp_path: Path, timings: list[tuple], machine: dict | None = None, name: str = "gpu-run") -> Path:
    """A results file of a GPU run holding ``timings``: (pass, shape, layout, backend, plan, ms),
    optionally followed by the wall clock per call and the CUDA-graph time per call, in ms."""
    template = _template()
    benchmarks = []
    for pass_name, shape, layout, backend, plan, ms, *wall in timings:
        bench = copy.deepcopy(template)
        bench["extra_info"].update(
            {"pass": pass_name, "shape": list(shape), "layout": layout, "dtype": "float32"},
            backend=backend,
            plan=plan,
            ms=ms,
        )
        if wall:
            bench["extra_info"]["wall_ms"] = wall[0]
        if len(wall) > 1:
            bench["extra_info"]["cudagraph_ms"] = wall[1]
        bench["group"] = f"{pass_name} {shape} {layout}"
        benchmarks.append(bench)
    path = tmp_path / f"{name}.json"
    info = {"tritonbn": {**GPU, **(machine or {})}}
    run = {"machine_info": info, "datetime": "2026-11-30T00:00:00", "benchmarks": benchmarks}
    path.write_text(json.dumps(run))
    return path


LENET_CONV1, FC2, CONV2 = (256, 6, 24, 24), (256, 84), (256, 16, 8, 8)
TIMINGS = [
    # conv1: split-welford beats torch; the automatic run of the same plan does not count twice.
    ("forward+backward", LENET_CONV1, "contiguous", "torch", None, 1.0),
    ("forward+backward", LENET_CONV1, "contiguous", "split-welford", "split-welford", 0.8),
    ("forward+backward", LENET_CONV1, "contiguous", "tritonbn", "split-welford", 0.82),
    ("forward+backward", LENET_CONV1, "contiguous", "reference", None, 0.1),
    ("forward+backward", LENET_CONV1, "contiguous", "torch.compile", None, 0.1),
    ("forward", LENET_CONV1, "contiguous", "torch", None, 9.0),
    # fc2: torch is fastest: routed to torch.
    ("forward+backward", FC2, "contiguous", "torch", None, 0.5),
    ("forward+backward", FC2, "contiguous", "fused-small", "fused-small", 0.7),
    ("forward+backward", FC2, "contiguous", "column-tiled", "column-tiled", 0.9),
    # conv2 channels_last eval: no forced run reached; the automatic run stands for its plan.
    ("eval", CONV2, "channels_last", "torch", None, 0.3),
    ("eval", CONV2, "channels_last", "tritonbn", "eval", 0.2),
    # torch alone: no entry.
    ("eval", FC2, "contiguous", "torch", None, 0.3),
]


def by_case(table: dict) -> dict[tuple, dict]:
    return {(entry["mode"], entry["layout"], tuple(entry["shape"])): entry for entry in table["entries"]}


def test_each_case_takes_its_fastest_candidate(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert tuning_from_results.main([str(gpu_run(tmp_path, TIMINGS)), "--out", str(out)]) == 0
    loaded = tuning.load_table(out)
    assert (loaded.device, loaded.capability) == ("Fake GPU 9000", (9, 0))
    table = json.loads(out.read_text())
    assert table["versions"] == {"torch": "2.11.0+cu130", "triton": "3.6.0", "tritonbn": "0.1.0"}
    entries = by_case(table)
    expected = {("train", "nchw", LENET_CONV1), ("train", "2d", FC2), ("eval", "channels_last", CONV2)}
    assert set(entries) == expected
    conv1 = entries["train", "nchw", LENET_CONV1]
    assert conv1["choice"] == "split-welford"
    assert conv1["timings_ms"] == {"split-welford": 0.8, "torch": 1.0}
    assert conv1["ratio_to_torch"] == pytest.approx(0.8)
    fc2 = entries["train", "2d", FC2]
    assert fc2["choice"] == "torch" and fc2["timings_ms"]["column-tiled"] == 0.9
    assert entries["eval", "channels_last", CONV2]["timings_ms"] == {"eval": 0.2, "torch": 0.3}
    printed = capsys.readouterr().out
    assert "train float32 2d (256, 84): torch" in printed
    assert "3 entries, 1 routed to torch" in printed


def decide(shape: tuple[int, ...], strides: tuple[int, ...]) -> dispatch.Plan:
    """The automatic dispatcher's training plan for a float32 CUDA input."""
    args = (torch.float32, shape, strides, True, "auto", None, "default", True, True)
    return dispatch._decide(torch.device("cuda"), *args)


def test_the_dispatcher_follows_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "packaged_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(tuning, "device_identity", lambda device: ("Fake GPU 9000", (9, 0)))
    out = tuning.user_dir() / "fake.json"
    tuning_from_results.main([str(gpu_run(tmp_path, TIMINGS)), "--out", str(out)])
    tuning.reload()
    try:
        routed = decide(FC2, (84, 1))
        assert (routed.backend, routed.kernel) == ("torch", None)
        assert "torch measured 0.5 ms, the fastest kernel fused-small 0.7 ms (1.40x torch's)" in routed.tuning
        kept = decide(LENET_CONV1, (3456, 576, 24, 1))
        assert (kept.backend, kept.kernel) == ("triton", "split-welford")
        assert "0.80x torch's 1 ms" in kept.tuning
    finally:
        monkeypatch.undo()
        tuning.reload()


def test_the_benchmarks_win_and_the_tuners_entries_fill_in(tmp_path):
    tuned = tmp_path / "tuned.json"
    conv1 = tune.table_entry(
        tune.Case(LENET_CONV1, torch.float32, False, True), {"torch": 1.1, "fused-small": 0.6}
    )
    other = tune.Case((32, 64, 56, 56), torch.float32, False, True)
    tune.write_table(
        tuned,
        tune.table_document(
            ("Fake GPU 9000", (9, 0)),
            132,
            [conv1, tune.table_entry(other, {"torch": 0.1, "split-welford": 0.2})],
        ),
    )
    out = tmp_path / "table.json"
    run = gpu_run(tmp_path, TIMINGS, machine={"capability": None})
    tuning_from_results.main([str(run), "--tuned", str(tuned), "--out", str(out)])
    entries = by_case(json.loads(out.read_text()))
    assert entries["train", "nchw", LENET_CONV1]["choice"] == "split-welford"
    assert entries["train", "nchw", other.shape]["choice"] == "torch"
    assert entries["train", "2d", FC2]["choice"] == "torch"
    assert len(entries) == 4


def test_the_wall_clock_decides_and_several_runs_give_medians(tmp_path):
    # fc2: torch's device events are faster, but a caller waits longer for it: the wall clock wins.
    first = [
        ("forward+backward", FC2, "contiguous", "torch", None, 0.05, 0.30),
        ("forward+backward", FC2, "contiguous", "tritonbn", "fused-small", 0.10, 0.20),
        ("forward+backward", LENET_CONV1, "contiguous", "torch", None, 1.0, 1.0),
        ("forward+backward", LENET_CONV1, "contiguous", "tritonbn", "split-welford", 0.5, 0.9),
    ]
    second = [
        ("forward+backward", FC2, "contiguous", "torch", None, 0.05, 0.20),
        ("forward+backward", FC2, "contiguous", "tritonbn", "fused-small", 0.10, 0.30),
        ("forward+backward", LENET_CONV1, "contiguous", "torch", None, 1.0, 1.0),
        ("forward+backward", LENET_CONV1, "contiguous", "tritonbn", "split-welford", 0.5, 1.3),
    ]
    third = [("forward+backward", FC2, "contiguous", "tritonbn", "fused-small", 0.10, 0.21)]
    runs = [gpu_run(tmp_path, timings, name=f"run{n}") for n, timings in enumerate((first, second, third))]
    out = tmp_path / "table.json"
    tuning_from_results.main([*map(str, runs), "--out", str(out)])
    table = json.loads(out.read_text())
    entries = by_case(table)
    # fc2: torch's median 0.25 ms against fused-small's 0.21 (of 0.20, 0.30, 0.21).
    assert entries["train", "2d", FC2]["timings_ms"] == pytest.approx({"torch": 0.25, "fused-small": 0.21})
    assert entries["train", "2d", FC2]["choice"] == "fused-small"
    # conv1: split-welford's median 1.1 ms against torch's 1.0.
    assert entries["train", "nchw", LENET_CONV1]["choice"] == "torch"
    assert table["source"]["benchmarks"] == [str(run) for run in runs]


def test_another_plan_replaces_the_dispatchers_own_only_beyond_the_noise(tmp_path):
    noise = tuning_from_results.NOISE
    timings = [
        # fc2: split-welford within the noise of the automatic fused-small: fused-small stays.
        ("forward+backward", FC2, "contiguous", "torch", None, 1.0),
        ("forward+backward", FC2, "contiguous", "tritonbn", "fused-small", 0.5 * (1 + noise / 2)),
        ("forward+backward", FC2, "contiguous", "split-welford", "split-welford", 0.5),
        # conv2: split-welford beyond it: chosen.
        ("forward+backward", CONV2, "contiguous", "torch", None, 1.0),
        ("forward+backward", CONV2, "contiguous", "tritonbn", "fused-small", 0.5 * (1 + 2 * noise)),
        ("forward+backward", CONV2, "contiguous", "split-welford", "split-welford", 0.5),
        # conv1: torch faster by less than the noise still wins: no case slower than torch.
        ("forward+backward", LENET_CONV1, "contiguous", "torch", None, 1.0),
        ("forward+backward", LENET_CONV1, "contiguous", "tritonbn", "split-welford", 1.0 + noise / 2),
    ]
    out = tmp_path / "table.json"
    tuning_from_results.main([str(gpu_run(tmp_path, timings)), "--out", str(out)])
    entries = by_case(json.loads(out.read_text()))
    fc2 = entries["train", "2d", FC2]
    assert fc2["choice"] == "fused-small" and fc2["ratio_to_torch"] == pytest.approx(0.5 * (1 + noise / 2))
    assert entries["train", "nchw", CONV2]["choice"] == "split-welford"
    assert entries["train", "nchw", LENET_CONV1]["choice"] == "torch"


def test_another_plan_faster_on_the_host_alone_does_not_replace_the_dispatchers_own(tmp_path):
    # conv2 as on the H200: split-welford 13% faster by the wall clock of one run, but slower
    # replayed from a CUDA graph (its two launches each way): fused-small stays. fc2: faster both
    # ways: replaced.
    timings = [
        ("forward+backward", CONV2, "contiguous", "torch", None, 0.12, 0.17, 0.022),
        ("forward+backward", CONV2, "contiguous", "tritonbn", "fused-small", 0.12, 0.146, 0.014),
        ("forward+backward", CONV2, "contiguous", "split-welford", "split-welford", 0.10, 0.127, 0.016),
        ("forward+backward", FC2, "contiguous", "torch", None, 0.12, 0.17, 0.022),
        ("forward+backward", FC2, "contiguous", "tritonbn", "fused-small", 0.12, 0.146, 0.014),
        ("forward+backward", FC2, "contiguous", "split-welford", "split-welford", 0.10, 0.127, 0.012),
    ]
    out = tmp_path / "table.json"
    tuning_from_results.main([str(gpu_run(tmp_path, timings)), "--out", str(out)])
    entries = by_case(json.loads(out.read_text()))
    assert entries["train", "nchw", CONV2]["choice"] == "fused-small"
    assert entries["train", "2d", FC2]["choice"] == "split-welford"


def test_runs_of_different_gpus_make_no_table(tmp_path):
    runs = [
        gpu_run(tmp_path, TIMINGS, name="a"),
        gpu_run(tmp_path, TIMINGS, {"device_name": "Other"}, name="b"),
    ]
    with pytest.raises(SystemExit, match="different GPUs"):
        tuning_from_results.main([*map(str, runs), "--out", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def test_a_candidate_the_tuner_rejected_is_not_chosen_on_the_benchmarks_word(tmp_path):
    tuned = tmp_path / "tuned.json"
    case = str(tune.Case(LENET_CONV1, torch.float32, False, True))
    failure = {"case": case, "candidate": "split-welford", "reason": "output off by 1e-2"}
    document = tune.table_document(("Fake GPU 9000", (9, 0)), 132, [])
    tune.write_table(tuned, {**document, "failures": [failure], "dropped": []})
    out = tmp_path / "table.json"
    tuning_from_results.main([str(gpu_run(tmp_path, TIMINGS)), "--tuned", str(tuned), "--out", str(out)])
    table = json.loads(out.read_text())
    # conv1 keeps torch alone: no entry. The others as without the tuner.
    assert set(by_case(table)) == {("train", "2d", FC2), ("eval", "channels_last", CONV2)}
    assert table["failures"] == [failure]


@pytest.mark.parametrize(
    ("machine", "message"),
    [
        ({"device_type": "cpu"}, "not a GPU run"),
        ({"capability": None}, "does not record the GPU's compute capability"),
    ],
    ids=["cpu", "no-capability"],
)
def test_a_run_that_cannot_make_a_table_says_why(tmp_path, machine, message):
    run = gpu_run(tmp_path, TIMINGS, machine)
    with pytest.raises(SystemExit, match=message):
        tuning_from_results.main([str(run), "--out", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()
