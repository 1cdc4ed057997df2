"""Test set-up: without a GPU the Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before ``tritonbn.kernels`` is imported (Triton decides at
``@triton.jit`` time), so it is set here, at collection, before any test module imports tritonbn.
With a CUDA device the same tests run the compiled kernels on it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
