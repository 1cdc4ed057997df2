"""The tuner and its tables, without a GPU: the sweep end to end with an injected timer (the
kernels checked against the reference through the interpreter), table lookup and precedence,
the dispatcher reading a table, and every grid configuration compiling for sm_90."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonbn
from tritonbn import dispatch, tune, tuning
from tritonbn.kernels import ops
from tritonbn.kernels.layout import describe_strides
from tritonbn.kernels.plans import (
    DEFAULT_TUNABLES,
    FUSED_MAX_TILE,
    KERNEL_PLANS,
    MAX_COLUMN_BLOCK,
    TILE,
    PlanName,
    Tunables,
    geometry,
    parse_plan,
    plan_token,
)

FAKE_GPU = ("Fake GPU 9000", (9, 0))
TRAIN = tune.Case((8, 3, 4, 4), torch.float32, False, True)
EVAL = tune.Case((16, 4), torch.float32, False, False)


@pytest.fixture(autouse=True)
def isolated_tables(tmp_path, monkeypatch):
    """No table but the test's own: the user folder and the packaged folder are temporary."""
    user = tmp_path / "cache"
    packaged = tmp_path / "packaged"
    packaged.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(user))
    monkeypatch.delenv(tuning.ENV, raising=False)
    monkeypatch.setattr(tuning, "packaged_dir", lambda: packaged)
    tuning.reload()
    yield packaged
    monkeypatch.undo()
    tuning.reload()


def fake_identity(monkeypatch, identity=FAKE_GPU):
    """Tables apply to CPU tensors as if they sat on ``identity``'s GPU."""
    monkeypatch.setattr(tuning, "device_identity", lambda device: identity)
    tuning.reload()


def timer_from(times: dict[str, float], calls: list[tuple[str, str]] | None = None):
    def timer(fn, case, label):
        if calls is not None:
            calls.append((str(case), label))
        return times.get(label, 10.0)

    return timer


def entry(shape, choice, timings, *, dtype="float32", mode="train", channels_last=False):
    case = tune.Case(tuple(shape), getattr(torch, dtype), channels_last, mode == "train")
    layout = describe_strides(case.shape, case.strides)
    return {
        "layout": layout.name,
        "dtype": dtype,
        "mode": mode,
        "shape": list(shape),
        "per_channel": layout.rows,
        "channels": layout.c,
        "choice": choice,
        "timings_ms": timings,
        "torch_ms": timings["torch"],
        "ratio_to_torch": timings[choice] / timings["torch"],
    }


def write_table(
    folder: Path, entries, *, name=FAKE_GPU[0], capability=FAKE_GPU[1], schema=1, file="table.json"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    path.write_text(
        json.dumps(
            {
                "schema": schema,
                "device": {"name": name, "capability": list(capability), "sm_count": 4},
                "versions": {},
                "date": "test",
                "entries": entries,
            }
        )
    )
    return path


# --- Tunables in the geometry ---------------------------------------------------------------


def test_default_tunables_are_the_module_constants():
    assert (DEFAULT_TUNABLES.fused_max_tile, DEFAULT_TUNABLES.tile, DEFAULT_TUNABLES.max_column_block) == (
        FUSED_MAX_TILE,
        TILE,
        MAX_COLUMN_BLOCK,
    )
    assert DEFAULT_TUNABLES.encode() == ""
    assert plan_token("split-welford") == "split-welford"


def test_tunables_token_round_trip_and_validation():
    tunables = Tunables(tile=8192, num_warps=4)
    token = plan_token("split-welford", tunables)
    assert token == "split-welford@tile=8192,num_warps=4"
    assert parse_plan(token) == (KERNEL_PLANS["split-welford"], tunables)
    assert parse_plan(PlanName("split-welford", token))[1] == tunables
    with pytest.raises(ValueError, match="unknown tunable"):
        parse_plan("split-welford@tiles=8192")
    with pytest.raises(ValueError, match="power of two"):
        Tunables(tile=3000)
    with pytest.raises(ValueError, match="num_warps must be at most 32, got 64"):
        Tunables(num_warps=64)
    with pytest.raises(ValueError, match="num_warps must be at most 32"):
        parse_plan("fused-small@num_warps=64")
    with pytest.raises(ValueError, match="unknown kernel plan"):
        parse_plan("warp-drive")


def test_tunables_change_the_geometry_and_the_fused_refusal():
    layout = describe_strides((256, 120), (120, 1))
    default = geometry(layout, channel_major=False, sm_count=132)
    assert default == geometry(layout, channel_major=False, sm_count=132, tunables=DEFAULT_TUNABLES)
    narrow = geometry(layout, channel_major=False, sm_count=132, tunables=Tunables(max_column_block=32))
    assert (default.block_k, narrow.block_k) == (64, 32)
    warps = geometry(layout, channel_major=False, sm_count=132, tunables=Tunables(num_warps=2))
    assert warps.num_warps == 2 and default.num_warps != 2
    big = describe_strides((8192, 1024), (1024, 1))
    fused = KERNEL_PLANS["fused-small"]
    assert fused.refusal(big, True) is not None
    assert fused.refusal(big, True, Tunables(fused_max_tile=65536)) is None


def test_launch_site_keys_hold_the_tunables():
    x = torch.empty(64, 3, 32, 32)
    tuned_token = plan_token("split-welford", Tunables(tile=2048))
    default = ops.site(x, "split-welford", 4, False, None, "train")
    tuned = ops.site(x, tuned_token, 4, False, None, "train")
    geo, tuned_geo = default.reduction, tuned.reduction
    assert (geo.block_r * geo.block_k, tuned_geo.block_r * tuned_geo.block_k) == (TILE, 2048)
    assert default.key != tuned.key and default.id != tuned.id
    assert Tunables(tile=2048) in tuned.key
    assert ops.site(x, tuned_token, 4, False, None, "train") is tuned


# --- The sweep with an injected timer ---------------------------------------------------------


@pytest.mark.interpreter
def test_sweep_selects_the_fastest_checked_candidate_and_writes_schema_1(tmp_path):
    train_labels = [c.label for c in tune.candidates(TRAIN, 4)]
    assert train_labels[0] == "torch" and "fused-small" in train_labels
    variant = next(label for label in train_labels if "@" in label)
    calls: list[tuple[str, str]] = []
    times = {"torch": 5.0, variant: 1.0, "eval": 9.0}
    out = tmp_path / "t.json"
    result = tune.run_sweep(
        600, out, progress=False, timer=timer_from(times, calls), sweep_cases=[TRAIN, EVAL], identity=FAKE_GPU
    )
    assert result["out"] == str(out)
    written = json.loads(out.read_text())
    assert written["schema"] == tuning.SCHEMA == 1
    assert written["device"] == {"name": FAKE_GPU[0], "capability": [9, 0], "sm_count": 4}
    assert set(written["versions"]) == {"torch", "triton", "tritonbn"}
    assert written["failures"] == [] and written["skipped"] == 0
    by_mode = {e["mode"]: e for e in written["entries"]}
    assert by_mode["train"]["choice"] == variant
    assert by_mode["train"]["ratio_to_torch"] == pytest.approx(0.2)
    assert set(by_mode["train"]["timings_ms"]) == set(train_labels)
    assert by_mode["eval"]["choice"] == "torch"  # torch (5 ms) beat every eval candidate (9, 10)
    # Every candidate was timed once, after its check.
    assert sorted(label for _, label in calls) == sorted(
        train_labels + [c.label for c in tune.candidates(EVAL, 4)]
    )
    # The written table loads and the lookup finds the choice.
    table = tuning.load_table(out)
    match = tuning.lookup(FAKE_GPU, TRAIN.layout, "float32", True, 128, 3, candidates=(table,))
    assert match is not None and match.entry.choice == variant


@pytest.mark.interpreter
def test_sweep_drops_and_reports_a_candidate_that_fails_the_reference(tmp_path, monkeypatch):
    broken = "split-welford"
    real_runner = tune._runner

    def runner(case, label, inputs):
        run = real_runner(case, label, inputs)
        if label != broken:
            return run
        return lambda: tuple(t + 1 if i == 1 else t for i, t in enumerate(run()))  # wrong dx

    monkeypatch.setattr(tune, "_runner", runner)
    calls: list[tuple[str, str]] = []
    result = tune.run_sweep(
        600,
        tmp_path / "t.json",
        progress=False,
        timer=timer_from({broken: 0.1}, calls),
        sweep_cases=[TRAIN],
        identity=FAKE_GPU,
    )
    assert [(f["candidate"], f["reason"].split(":")[0]) for f in result["failures"]] == [(broken, "dx")]
    assert broken not in {label for _, label in calls}
    assert result["entries"][0]["choice"] != broken
    assert broken not in result["entries"][0]["timings_ms"]


@pytest.mark.interpreter
def test_sweep_drops_a_candidate_that_launches_what_a_timed_one_launched(tmp_path, monkeypatch):
    # On a GPU, splits fitted to the programs an SM holds can make two candidates launch the same
    # kernels on the same grids: the later one is dropped, not timed again.
    labels = [c.label for c in tune.candidates(TRAIN, 4) if c.label != "torch"]
    first, twin, other = labels[0], labels[-1], labels[1]
    launched = {first: (("kernel-a", (3, 4)),), twin: (("kernel-a", (3, 4)),)}

    def screen(case, names, device):
        (label,) = names
        return [tune.Screening(label, launches=launched.get(label, ((f"kernel-{label}", (3, 1)),)))]

    monkeypatch.setattr(tune, "screen", screen)
    calls: list[tuple[str, str]] = []
    result = tune.run_sweep(
        600,
        tmp_path / "t.json",
        progress=False,
        timer=timer_from({}, calls),
        sweep_cases=[TRAIN],
        identity=FAKE_GPU,
        screen_candidates=True,
    )
    timed = [label for _, label in calls]
    assert first in timed and other in timed and twin not in timed
    assert result["dropped"] == [
        {
            "case": str(TRAIN),
            "candidate": twin,
            "reason": f"launches what {first} launches (the same kernels on the same grids)",
        }
    ]


@pytest.mark.interpreter
def test_short_budget_skips_the_grid_from_its_end(tmp_path):
    ticks = iter(range(10_000))
    calls: list[tuple[str, str]] = []
    cases = [TRAIN, tune.Case((8, 3, 4, 4), torch.bfloat16, False, True)]
    result = tune.run_sweep(
        5,
        tmp_path / "t.json",
        progress=False,
        timer=timer_from({}, calls),
        sweep_cases=cases,
        identity=FAKE_GPU,
        clock=lambda: next(ticks),
    )
    assert result["skipped"] > 0
    # float32 first, and within it tier 0 (torch and the heuristic plan) before the rest.
    tier0 = [c.label for c in tune.candidates(TRAIN, 4) if c.tier == 0]
    assert [label for _, label in calls][: len(tier0)] == tier0
    assert all(case == str(TRAIN) for case, _ in calls)


def test_sweep_needs_cuda_without_a_timer(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        tune.run_sweep(1, tmp_path / "t.json")
    assert tune.main(["--budget-s", "1", "--no-progress"]) == 2
    assert not (tmp_path / "t.json").exists()


def test_cli_help_documents_the_sweep(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--budget-s", "--out", "float32, then bfloat16", "tier 0", "do_bench", "spill"):
        assert words in text


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "inf"])
def test_cli_refuses_a_budget_that_is_not_a_positive_number(budget, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--budget-s", budget, "--list"])
    assert exit_info.value.code == 2
    assert "--budget-s must be a positive number of seconds" in capsys.readouterr().err


def test_each_input_is_swept_once():
    # (4096, 64, 1, 1) in channels_last is contiguous: the same input as its NCHW case.
    swept = tune.cases(dtypes=[torch.float32])
    assert len({(c.shape, c.strides, c.training) for c in swept}) == len(swept)
    assert [c.channels_last for c in swept if c.shape == (4096, 64, 1, 1)] == [False, False]
    assert [c.channels_last for c in swept if c.shape == (256, 6, 24, 24)] == [False, True] * 2


def test_default_out_is_in_the_user_tuning_folder(tmp_path):
    assert tune.default_out("NVIDIA H200") == tmp_path / "cache" / "tritonbn" / "tuning" / "NVIDIA-H200.json"


# --- Loading, versioning, bucketing, precedence -----------------------------------------------


def test_other_schema_and_malformed_entries_are_refused(tmp_path):
    with pytest.raises(tuning.TableError, match="schema 2"):
        tuning.load_table(write_table(tmp_path, [], schema=2))
    bad = entry((8, 3, 4, 4), "warp-drive", {"torch": 1.0, "warp-drive": 0.5})
    with pytest.raises(tuning.TableError, match="unknown kernel plan"):
        tuning.load_table(write_table(tmp_path, [bad]))
    missing = entry((8, 3, 4, 4), "torch", {"torch": 1.0})
    missing["choice"] = "split-welford"
    with pytest.raises(tuning.TableError, match="no timing"):
        tuning.load_table(write_table(tmp_path, [missing]))


def test_unreadable_tables_are_skipped_with_a_warning(tmp_path):
    write_table(tuning.user_dir(), [], schema=99)
    with pytest.warns(RuntimeWarning, match="ignores a tuning table"):
        assert tuning.tables() == ()


def test_tables_that_break_the_json_or_number_readers_are_refused(tmp_path):
    huge = entry((8, 3, 4, 4), "torch", {"torch": 1.0})
    path = write_table(tmp_path, [huge])
    path.write_text(path.read_text().replace('"per_channel": 128', '"per_channel": 1e400'))
    with pytest.raises(tuning.TableError, match="OverflowError"):
        tuning.load_table(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(tuning.TableError, match="not a readable JSON table"):
        tuning.load_table(path)


def test_without_a_home_only_the_packaged_tables_are_read(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(tuning.Path, "home", no_home)
    with pytest.warns(RuntimeWarning, match="no user tuning tables: Could not determine home"):
        assert tuning.tables() == ()


def test_lookup_takes_the_nearest_bucket_of_the_same_layout_dtype_and_mode(tmp_path):
    near = entry((8, 3, 4, 4), "split-welford", {"torch": 2.0, "split-welford": 1.0})
    far = entry((8, 64, 4, 4), "torch", {"torch": 1.0, "split-welford": 2.0})
    table = tuning.load_table(write_table(tmp_path, [far, near]))
    layout = near["layout"]

    def found(per_channel, channels, dtype="float32", training=True, where=layout):
        match = tuning.lookup(FAKE_GPU, where, dtype, training, per_channel, channels, candidates=(table,))
        return None if match is None else match.entry.choice

    assert found(128, 3) == "split-welford"  # exact
    assert found(256, 4) == "split-welford"  # 2x per channel, 4/3 C: nearer the first
    assert found(128, 48) == "torch"  # C 48 is nearer 64 than 3
    assert found(128 * 16, 3) is None  # 16x per channel: beyond MAX_DISTANCE
    assert found(128, 3, dtype="float16") is None
    assert found(128, 3, training=False) is None
    assert found(128, 3, where="channels_last") is None


def test_precedence_user_then_packaged_then_same_capability(isolated_tables):
    def ent(choice):
        return entry(
            (8, 3, 4, 4), choice, {"torch": 1.0, "split-welford": 1.0, "fused-small": 1.0, choice: 0.5}
        )

    write_table(isolated_tables, [ent("fused-small")], file="packaged.json")
    tuning.reload()
    assert tuning.lookup(FAKE_GPU, ent("torch")["layout"], "float32", True, 128, 3).table.origin == "packaged"
    write_table(tuning.user_dir(), [ent("split-welford")], file="mine.json")
    tuning.reload()
    match = tuning.lookup(FAKE_GPU, ent("torch")["layout"], "float32", True, 128, 3)
    assert (match.table.origin, match.entry.choice, match.kind) == ("user", "split-welford", "exact device")
    # Another GPU of the same compute capability uses the tables after its exact-name ones.
    match = tuning.lookup(("Other GPU", (9, 0)), ent("torch")["layout"], "float32", True, 128, 3)
    assert (match.table.origin, match.kind) == ("user", "same compute capability")
    assert tuning.lookup(("Old GPU", (8, 0)), ent("torch")["layout"], "float32", True, 128, 3) is None
    # An exact-name packaged table beats a user table of another GPU of the same capability.
    (tuning.user_dir() / "mine.json").unlink()
    write_table(tuning.user_dir(), [ent("split-welford")], name="Other GPU", file="other.json")
    tuning.reload()
    match = tuning.lookup(FAKE_GPU, ent("torch")["layout"], "float32", True, 128, 3)
    assert (match.table.origin, match.entry.choice) == ("packaged", "fused-small")


# --- The dispatcher reading a table -----------------------------------------------------------


def tuned_table(choice="split-welford@tile=2048", shape=(8, 3, 4, 4), mode="train", **times):
    timings = {"torch": 2.0, "split-welford": 1.5, "fused-small": 1.2, choice: 1.0, **times}
    return write_table(tuning.user_dir(), [entry(shape, choice, timings, mode=mode)])


def test_explain_reports_the_table_entry_and_ratio(monkeypatch):
    path = tuned_table()
    fake_identity(monkeypatch)
    x = torch.randn(8, 3, 4, 4)
    plan = tritonbn.explain(x, backend="triton")
    assert plan.kernel == "split-welford" and plan.kernel in tritonbn.PLANS
    assert plan.kernel.token == "split-welford@tile=2048"
    assert plan.tunables == "tile=2048"
    report = str(plan)
    assert f"tuning: table {path} (user, exact device {FAKE_GPU[0]})" in report
    assert "split-welford@tile=2048 measured 1 ms, 0.50x torch's 2 ms" in report
    assert "tunables: tile=2048" in report


def test_the_entrys_choice_runs_over_a_candidate_measured_a_little_faster(monkeypatch):
    # A table keeps a plan within the noise of a faster one (bench/tuning_from_results.py's NOISE):
    # the choice is what runs, and explain() quotes its own time.
    tuned_table(choice="fused-small", **{"fused-small": 1.05, "split-welford": 1.0})
    fake_identity(monkeypatch)
    plan = tritonbn.explain(torch.randn(8, 3, 4, 4), backend="triton")
    assert plan.kernel == "fused-small"
    assert "fused-small measured 1.05 ms, 0.53x torch's 2 ms" in plan.tuning


def test_heuristics_without_a_table_and_with_tuning_off(monkeypatch):
    x = torch.randn(8, 3, 4, 4)
    fake_identity(monkeypatch)
    assert "tuning: heuristics (no tuning table)" in str(tritonbn.explain(x, backend="triton"))
    tuned_table()
    monkeypatch.setenv(tuning.ENV, "off")
    tuning.reload()
    plan = tritonbn.explain(x, backend="triton")
    assert (plan.kernel, plan.tunables) == ("fused-small", "")
    assert type(plan.kernel) is str
    assert "tuning: heuristics (TRITONBN_TUNING=off)" in str(plan)
    monkeypatch.delenv(tuning.ENV)
    tuning.reload()
    assert tritonbn.explain(x, backend="triton").kernel.token == "split-welford@tile=2048"


@pytest.mark.interpreter
def test_tuned_plan_runs_and_matches_the_reference_bit_for_bit_twice(monkeypatch):
    tuned_table()
    fake_identity(monkeypatch)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    results = []
    with tritonbn.backend("triton"):
        for _ in range(2):
            mean, var = torch.zeros(3), torch.ones(3)
            y = tritonbn.batch_norm(x, mean, var, weight, bias, training=True)
            results.append((y, mean, var))
    expected = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), weight, bias, True)
    torch.testing.assert_close(results[0][0], expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)


def test_a_torch_entry_routes_auto_to_torch_but_not_forced_triton(monkeypatch):
    tuned_table(choice="torch", torch=0.5)
    fake_identity(monkeypatch)
    shape, strides = (8, 3, 4, 4), (48, 16, 4, 1)
    dispatch._decide.cache_clear()
    auto = dispatch._decide(
        torch.device("cuda"), torch.float32, shape, strides, True, "auto", None, "default", True, True
    )
    assert (auto.backend, auto.kernel) == ("torch", None)
    assert "torch measured 0.5 ms, the fastest kernel fused-small 1.2 ms (2.40x torch's)" in auto.tuning
    forced = tritonbn.explain(torch.randn(shape), backend="triton")
    # Forced triton: the fastest measured kernel candidate (fused-small, 1.2 ms) instead of torch.
    assert (forced.backend, forced.kernel) == ("triton", "fused-small")
    assert "fused-small measured 1.2 ms" in forced.tuning
    only_plan = tritonbn.explain(torch.randn(shape), backend="triton", plan="split-welford")
    assert only_plan.kernel == "split-welford" and "split-welford measured 1.5 ms" in only_plan.tuning


def test_an_entry_that_cannot_run_the_input_falls_back(monkeypatch):
    # fused-small with a 32-element tile limit cannot hold (8, 3, 4, 4)'s 128-element slab.
    tuned_table(choice="fused-small@fused_max_tile=32")
    fake_identity(monkeypatch)
    plan = tritonbn.explain(torch.randn(8, 3, 4, 4), backend="triton")
    assert plan.kernel == "fused-small" and plan.tunables == ""  # next fastest: fused-small, 1.2 ms


@pytest.mark.interpreter
def test_eval_entries_carry_eval_tunables(monkeypatch):
    tuned_table(choice="eval@tile=2048", mode="eval")
    fake_identity(monkeypatch)
    x = torch.randn(8, 3, 4, 4)
    plan = tritonbn.explain(x, training=False, backend="triton")
    assert (plan.kernel, plan.kernel.token) == ("eval", "eval@tile=2048")
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    with tritonbn.backend("triton"):
        y = tritonbn.batch_norm(x, mean, var, training=False)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, mean, var), rtol=1e-5, atol=1e-5)


# --- Every grid configuration compiles for sm_90 ----------------------------------------------

# A representative subset (the full grid is about 900 candidates, a few thousand kernel
# variants: far past this test's 90 s on two cores): on one case per plan, every candidate whose
# tunables change what is compiled (block sizes, warps; the programs-per-SM variants launch the
# same kernels on other grids), across the three dtypes and both tilings, plus the fused slabs
# of 32,768 and 65,536 elements at 16 warps, which spill in the backward and must be dropped.
COMPILE_SUBSET = [
    ((256, 16, 8, 8), "float32", False, True, "fused-small|split-welford"),
    ((256, 120), "bfloat16", False, True, "column-tiled"),
    ((32, 256, 14, 14), "float16", True, False, "eval"),
    ((32, 64, 56, 56), "float32", False, True, "split-welford@max_spatial_block=256"),
    ((4096, 64, 1, 1), "float32", False, True, "fused-small@fused_max_tile=32768"),
    ((8192, 1024), "float32", False, True, "fused-small@fused_max_tile=65536"),
]
MUST_SPILL = "fused-small@fused_max_tile=65536"

SCREEN_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import standin_cuda
standin_cuda.install()
import torch
from tritonbn import tune
out = []
for shape, dtype, channels_last, training, labels in json.loads(sys.argv[2]):
    case = tune.Case(tuple(shape), getattr(torch, dtype), channels_last, training)
    for found in tune.screen(case, labels, torch.device("cpu")):
        out.append({"case": str(case), "label": found.label, "dropped": found.dropped,
                    "kernels": found.kernels})
print(json.dumps(out))
"""


def _subset() -> list[list[object]]:
    """COMPILE_SUBSET's candidates; with TRITONBN_TUNE_FULL_COMPILE=1, every case's candidates
    that change what is compiled (the whole grid: minutes)."""
    if os.environ.get("TRITONBN_TUNE_FULL_COMPILE") == "1":
        return [
            [
                list(case.shape),
                str(case.dtype).replace("torch.", ""),
                case.channels_last,
                case.training,
                [
                    c.label
                    for c in tune.candidates(case, 132)
                    if c.label != "torch" and "programs_per_sm" not in c.label
                ],
            ]
            for case in tune.cases()
        ]
    spec = []
    for shape, dtype, channels_last, training, wanted in COMPILE_SUBSET:
        case = tune.Case(shape, getattr(torch, dtype), channels_last, training)
        labels = [
            c.label
            for c in tune.candidates(case, 132)
            if c.label != "torch"
            and "programs_per_sm" not in c.label
            and (c.label == wanted or c.label.partition("@")[0] in wanted.split("|"))
        ]
        spec.append([list(shape), dtype, channels_last, training, labels])
    return spec


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the sweep screens on the GPU")
def test_grid_candidates_compile_for_sm90_and_spilling_ones_are_dropped(tmp_path):
    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        import standin_cuda
    finally:
        sys.path.remove(str(bench))
    try:
        folder = standin_cuda.build(tmp_path / "standin")
    except (RuntimeError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot build the stand-in CUDA driver: {error}")
    spec = _subset()
    halves = [spec[0::2], spec[1::2]]  # two processes: this machine has two cores
    env = standin_cuda.environment(folder)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", SCREEN_SCRIPT, str(bench), json.dumps(half)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for half in halves
    ]
    found = []
    for child in children:
        stdout, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, stderr[-4000:]
        found += json.loads(stdout.strip().splitlines()[-1])
    labels = {(r["case"], r["label"]): r for r in found}
    assert len(labels) == sum(len(s[4]) for s in spec) >= 20
    for r in found:
        # Every candidate compiled for sm_90: a fused plan launches 2 kernels in training, a
        # split plan 4, eval 1; none failed to compile or launch.
        assert r["kernels"], r
        assert not (r["dropped"] or "").startswith("does not compile"), r
        assert all(k["registers"] > 0 for k in r["kernels"].values()), r
        # Dropped exactly when a kernel spills (or overflows shared memory, which none does).
        spills = any(k["spill_bytes"] > 0 for k in r["kernels"].values())
        assert bool(r["dropped"]) == spills, r
    assert any("spills" in (r["dropped"] or "") for r in found if r["label"] == MUST_SPILL)
    defaults = [r for r in found if "@" not in r["label"]]
    assert defaults and not any(r["dropped"] for r in defaults)  # today's heuristics never spill
