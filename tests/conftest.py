"""Test set-up: without a GPU the Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before ``tritonbn.kernels`` is imported (Triton decides at
``@triton.jit`` time), so it is set here, at collection, before any test module imports tritonbn.
With a CUDA device the tests that take the ``device`` fixture run the compiled kernels on it.

Many tests run the Triton backend on CPU tensors, which only the interpreter can do: those
parametrized with ``backend="triton"`` that do not take the ``device`` fixture, and those marked
``interpreter``. Where the kernels are compiled (a CUDA machine) they are skipped, with that
reason; CI runs them.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Inductor's caches key a compiled graph on its code, not on the fake implementations of the custom
# ops it calls: a graph cached before tritonbn/autograd.py changed what a fake returns is replayed
# with the old shapes ("expected size 2==4"). The tests keep a cache per version of that file.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _ops = Path(__file__).resolve().parent.parent / "tritonbn" / "autograd.py"
    _digest = hashlib.sha256(_ops.read_bytes()).hexdigest()[:12]
    _cache = Path(tempfile.gettempdir()) / f"torchinductor-tritonbn-{_digest}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_cache)

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on: CUDA when present, else the CPU through the interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """Each test starts from the automatic backend, whatever the caller's environment says."""
    monkeypatch.delenv("TRITONBN_BACKEND", raising=False)
    monkeypatch.delenv("TRITONBN_PLAN", raising=False)
    torch.manual_seed(0)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def runs_kernels_on_cpu_tensors(item: pytest.Item) -> bool:
    """Whether a test runs the Triton kernels on CPU tensors (see the module docstring)."""
    if item.get_closest_marker("interpreter") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    backend = None if callspec is None else callspec.params.get("backend")
    return backend == "triton" and "device" not in item.fixturenames


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Where the kernels are compiled, skip the tests that run them on CPU tensors."""
    if INTERPRETED:
        return
    skip = pytest.mark.skip(
        reason="runs the Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1: the kernels "
        "are compiled here (CI runs it through the interpreter)"
    )
    for item in items:
        if runs_kernels_on_cpu_tensors(item):
            item.add_marker(skip)
