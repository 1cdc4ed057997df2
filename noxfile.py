"""The test matrix: ruff, then the whole suite on each torch/Triton pair tritonbn supports.

``make test`` runs every session; ``nox -s "tests(pair='oldest')"`` runs one. The pairs are the
floors of ``pyproject.toml`` (the GPU machine's versions) and the newest release tested. Each
session's environment lives in ``.nox/`` and is reused by the next run (the pins are reinstalled,
which pip skips when they are already there). Arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

# (torch, triton, torchvision) releases that install together; "oldest" must equal the floors of
# pyproject.toml's dependencies.
VERSION_PAIRS = {
    "newest": ("2.14.1", "3.8.0", "0.29.1"),
    "oldest": ("2.11.0", "3.6.0", "0.26.0"),
}

PRINT_VERSIONS = (
    "import platform, torch, triton, torchvision; "
    "print(f'python {platform.python_version()}  torch {torch.__version__}  "
    "triton {triton.__version__}  torchvision {torchvision.__version__}')"
)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree: the lint rules, and the formatting `ruff format` gives."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize("pair", list(VERSION_PAIRS))
def tests(session: nox.Session, pair: str) -> None:
    """The test suite, the kernels through Triton's interpreter without a GPU, and each benchmark
    once as a check, on one version pair."""
    torch_version, triton_version, torchvision_version = VERSION_PAIRS[pair]
    session.install(
        "-e",
        ".[test]",
        f"torch=={torch_version}",
        f"triton=={triton_version}",
        f"torchvision=={torchvision_version}",
    )
    session.run("python", "-c", PRINT_VERSIONS)
    # Arguments after `--` replace the default selection: `nox -s ... -- -x tests/test_kernels.py`.
    selection = session.posargs or ["tests", "bench"]
    session.run("python", "-m", "pytest", "-q", "--benchmark-disable", *selection)
