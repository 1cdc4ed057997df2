"""The generated reference docs/api.md covers the whole public API and matches its docstrings and
signatures: a change to either regenerates it (`python docs/gen_api.py`). The reproduction page's
renderer reads the committed run records, and leaves out a run with no finished epoch."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tritonbn

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCRIPT = DOCS / "gen_api.py"


def load_script(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_api_reference_covers_the_public_api():
    gen_api = load_script(SCRIPT)
    assert sorted(gen_api.PUBLIC) == sorted(set(tritonbn.__all__) - {"__version__"})


def test_reproduction_renderer_reads_the_records_and_leaves_out_unfinished_runs(tmp_path, capsys):
    render = load_script(DOCS / "render_reproduction.py")
    committed = sorted(path for path in (DOCS / "reproduction").iterdir() if path.is_dir())
    assert committed, "no committed run record"
    unfinished = tmp_path / "interrupted"
    shutil.copytree(committed[0], unfinished)
    record = json.loads((unfinished / "metrics.json").read_text())
    (unfinished / "metrics.json").write_text(json.dumps({**record, "epochs": []}))
    runs = render.load_runs([*committed, unfinished])
    assert list(runs) == [path.name for path in committed]
    assert "has no finished epoch, left out" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="two run folders are named"):
        render.load_runs([committed[0], committed[0]])
