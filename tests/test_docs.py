"""The generated reference docs/api.md covers the whole public API and matches its docstrings and
signatures: a change to either regenerates it (`python docs/gen_api.py`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import tritonbn

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "gen_api.py"


def test_api_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_api_reference_covers_the_public_api():
    spec = importlib.util.spec_from_file_location("gen_api", SCRIPT)
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    assert sorted(gen_api.PUBLIC) == sorted(set(tritonbn.__all__) - {"__version__"})
