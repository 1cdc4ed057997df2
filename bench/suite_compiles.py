"""How many kernel variants the test suite compiles on a GPU, and how long that takes, measured
without one: what sizes the CUDA test step of ``bench/gpu_check.py`` (TEST_SHARDS, its budget).

    python bench/suite_compiles.py [--json OUT] [PYTEST ARGS ...]

Runs pytest (default: the suite's files that launch kernels in their own process) in a child
process under the stand-in CUDA driver (``standin_cuda.py``) with the kernels built for compiling,
not for the interpreter, and the automatic backend choosing the Triton kernels as it does on CUDA,
on a fresh Triton cache. Every launch then compiles its kernel variant for sm_90 for real and goes
through the real launch path, but nothing executes: the tests' results are garbage, and many fail
— only the compiles count. A test that fails stops before its later steps, so the count is a lower
bound of a GPU run's; fresh memory is zero-filled (``MALLOC_PERTURB_``), so that the garbage, where
the tests fail and the count are the same every run (without it, four runs counted 674 to 1174).
Prints the number of variants compiled, the seconds spent compiling and the seconds of the whole
run; ``--json`` also writes them with the number of entries in the Triton cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import standin_cuda  # noqa: E402  (the bench folder is not a package)

# Files that launch no kernel in the pytest process (subprocesses, process groups, the offline
# build) or cannot run under the stand-in: left out of the default selection.
LEFT_OUT = (
    "tests/test_compat.py",
    "tests/test_docs.py",
    "tests/test_glue.py",
    "tests/test_kernel_build.py",
    "tests/test_sync_batchnorm.py",
    "tests/test_train.py",
)
# The child's pytest plugin (this file, imported as a module): loaded before tests/conftest.py,
# which sets TRITON_INTERPRET.
PLUGIN = "suite_compiles"


def default_selection() -> list[str]:
    """The suite's test files less LEFT_OUT."""
    every = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py"))
    return [name for name in every if name not in LEFT_OUT]


def _install_in_child() -> None:
    """Run in the child before any test module: the stand-in as Triton's driver, tritonbn's kernels
    imported compiled, ``auto`` dispatching to Triton, and every Triton compile counted."""
    import atexit
    import importlib
    import pkgutil

    standin_cuda.install()
    import triton.compiler

    import tritonbn.kernels
    from tritonbn import dispatch

    for module in pkgutil.iter_modules(tritonbn.kernels.__path__):
        importlib.import_module(f"tritonbn.kernels.{module.name}")
    from tritonbn.kernels import runtime

    if runtime.interpreted():
        raise RuntimeError("the kernels were built for the interpreter: TRITON_INTERPRET is set")
    counted = {"compiles": 0, "compile_s": 0.0}
    compile_ = triton.compiler.compile

    def counting_compile(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return compile_(*args, **kwargs)
        finally:
            counted["compiles"] += 1
            counted["compile_s"] += time.perf_counter() - started

    triton.compiler.compile = counting_compile  # the JIT looks it up there when it first compiles
    requested = dispatch.requested_backend

    def as_on_cuda(device_type: str) -> tuple[str, str | None, str]:
        name, plan, source = requested(device_type)
        return ("triton" if name == "auto" else name), plan, source

    dispatch.requested_backend = as_on_cuda
    out = os.environ["SUITE_COMPILES_OUT"]
    atexit.register(lambda: Path(out).write_text(json.dumps(counted)))


if os.environ.get("SUITE_COMPILES_OUT") and __name__ == PLUGIN:
    _install_in_child()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = standin_cuda.build(Path(scratch) / "standin")
        out = Path(scratch) / "counted.json"
        env = standin_cuda.environment(folder)
        env.update(
            # glibc fills what malloc returns with 0xff ^ 255: zeros, so the tests' garbage
            # results, and so where they fail, are the same every run.
            MALLOC_PERTURB_="255",
            SUITE_COMPILES_OUT=str(out),
            TRITON_CACHE_DIR=str(Path(scratch) / "triton-cache"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        )
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", PLUGIN]
        command += pytest_args or default_selection()
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if not out.is_file():
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            print("the run ended before it could count its compiles", file=sys.stderr)
            return 1
        counted = json.loads(out.read_text())
        counted["cache_entries"] = sum(1 for _ in (Path(scratch) / "triton-cache").iterdir())
    figures = {**counted, "run_s": round(seconds, 1), "compile_s": round(counted["compile_s"], 1)}
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(
        f"{figures['compiles']} kernel variants compiled in {figures['compile_s']} s of a "
        f"{figures['run_s']} s run (pytest under the stand-in, results meaningless: {tail})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
