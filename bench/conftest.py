"""Benchmark set-up: the device, which cases run where, a time budget, and what the JSON records.

Without CUDA only the LeNet layers in float32 run, on torch, tritonbn's automatic dispatcher (its
CPU fallback) and the reference: the Triton interpreter and torch.compile are far too slow to time
on a CPU. ``--bench-quick`` keeps float32 forward+backward without torch.compile;
``--bench-budget SECONDS`` skips whatever is left once that much time has gone, so a capped run
still writes its ``--benchmark-json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# As in tests/conftest.py, and before anything imports tritonbn: Triton decides at import whether
# its kernels run through the interpreter, whichever of the two conftests pytest loads first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from cases import PASSES, TIERS, Case, dtype_name, tier
from environment import environment
from measure import TIMER, copy_gbps
from report import SCHEMA, add_speedups

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCH_DIR = Path(__file__).parent
CPU_BACKENDS = ("tritonbn", "torch", "reference")
_COPY_GBPS = pytest.StashKey[float]()
_STARTED = pytest.StashKey[float]()
_PLANNED = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tritonbn benchmarks")
    group.addoption(
        "--bench-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip the benchmarks still to run once SECONDS have passed since the first",
    )
    group.addoption(
        "--bench-quick", action="store_true", help="only float32 forward+backward, without torch.compile"
    )


def skip_reason(pass_name: str, case: Case, backend: str, quick: bool) -> str | None:
    """Why (pass, case, backend) is not timed in this session, or None when it is."""
    if DEVICE.type != "cuda":
        if case.family != "lenet" or case.dtype != torch.float32:
            return "no CUDA: only the LeNet layers in float32 are timed on a CPU"
        if backend == "torch.compile":
            return "no CUDA: torch.compile builds each shape for tens of seconds on a CPU"
        if backend not in CPU_BACKENDS:
            return "no CUDA: Triton's interpreter is far too slow to time a forced kernel plan"
    if quick and (pass_name != PASSES[0] or case.dtype != torch.float32 or backend == "torch.compile"):
        return "--bench-quick: only float32 forward+backward without torch.compile"
    return None


def _params(item: pytest.Item) -> dict[str, object]:
    """The parameters of a parametrized test item (none for the others)."""
    return getattr(getattr(item, "callspec", None), "params", {})


def item_tier(item: pytest.Item) -> int:
    """When a benchmark runs (``cases.tier``): a BatchNorm case by its pass, dtype and backend, the
    other suites by their module's ``TIER``, anything else last."""
    params = _params(item)
    if "case" in params:
        return tier(params["pass_name"], params["case"], params["backend"])
    return getattr(getattr(item, "module", None), "TIER", TIERS)


def planned_entry(item: pytest.Item) -> dict[str, object] | None:
    """What a collected benchmark will record if it runs, as the report matches records: the
    BatchNorm suite's pass, shape, dtype, layout, family and backend, the activation suite's shape,
    activation and variant; None for the others."""
    params = _params(item)
    if "case" in params:
        case = params["case"]
        return {
            "pass": params["pass_name"],
            "shape": list(case.shape),
            "dtype": dtype_name(case.dtype),
            "layout": case.layout,
            "family": case.family,
            "backend": params["backend"],
        }
    if "variant" in params and "activation" in params:
        return {
            "suite": "activation",
            "shape": list(params["shape"]),
            "activation": params["activation"],
            "variant": params["variant"],
        }
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip what this session does not time, and order the rest by tier across the suites (a run
    cut short by ``--bench-budget`` keeps what the targets need)."""
    quick = config.getoption("bench_quick", False)
    for item in items:
        params = _params(item)
        if item.path.is_relative_to(BENCH_DIR) and "case" in params:
            reason = skip_reason(params["pass_name"], params["case"], params["backend"], quick)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
    # The benchmarks take the places they had among the session's items, in tier order (a stable
    # sort: within a tier, collection order); other items (a `pytest tests bench` run) stay put.
    places = [index for index, item in enumerate(items) if item.path.is_relative_to(BENCH_DIR)]
    ordered = sorted((items[index] for index in places), key=item_tier)
    for index, item in zip(places, ordered, strict=True):
        items[index] = item


@pytest.fixture(autouse=True)
def _time_budget(request: pytest.FixtureRequest) -> None:
    budget = request.config.getoption("bench_budget")
    if budget is None:
        return
    started = request.config.stash.setdefault(_STARTED, time.monotonic())
    if time.monotonic() - started > budget:
        pytest.skip(f"--bench-budget of {budget:g} s spent")


@pytest.fixture
def device() -> torch.device:
    """Where the benchmarks run: CUDA when present, else the CPU."""
    return DEVICE


@pytest.fixture(scope="session")
def copy_bandwidth(request: pytest.FixtureRequest) -> float | None:
    """The device's copy bandwidth in GB/s, measured once a session; None when not timing."""
    if request.config.getoption("benchmark_disable"):
        return None
    gbps = copy_gbps(DEVICE)
    request.config.stash[_COPY_GBPS] = gbps
    return gbps


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note what this session plans to time, once ``-k`` and the like have deselected what they
    do: the report tells a case that failed or was not reached from one never meant to run."""
    session.config.stash[_PLANNED] = [
        entry
        for item in session.items
        if item.path.is_relative_to(BENCH_DIR) and item.get_closest_marker("skip") is None
        for entry in [planned_entry(item)]
        if entry is not None
    ]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["tritonbn"] = {
        **environment(DEVICE),
        "timer": TIMER[DEVICE.type],
        "copy_gbps": config.stash.get(_COPY_GBPS, None),
    }


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    """Mark the schema, list what was planned, add speedups; drop the raw per-round times (megabytes
    on a CPU), the params (``extra_info`` holds them in JSON form) and pytest-benchmark's options
    (the same for all)."""
    output_json["schema"] = SCHEMA
    output_json["planned"] = config.stash.get(_PLANNED, [])
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
        bench.pop("params", None)
        bench.pop("options", None)
    add_speedups(output_json["benchmarks"])
