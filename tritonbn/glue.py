"""The C++ glue of the eager fast path: built once per torch version, loaded when present.

``csrc/eager_glue.cpp`` is tritonbn's eager autograd Function in C++ (see ``tritonbn.eager``): a
Python autograd Function alone costs more host time than a whole ``torch.nn.BatchNorm`` layer.
It is compiled with the machine's C++ compiler against the installed torch, once, into
``$XDG_CACHE_HOME/tritonbn/glue`` (``~/.cache`` by default; the file name holds the torch version,
the Python version and a hash of the source), then loaded by every later process.

``TRITONBN_GLUE`` says when: ``auto`` (the default) builds it the first time a remembered call
could use it (a launch site with compiled launchers: a GPU, never the interpreter), printing one
line on stderr; ``off`` never uses it (the Python Function runs). :func:`build` builds it at
once, for scripts that prefer to pay the compile up front (``python -m tritonbn.glue``).
Without a compiler, or when the build fails, the Python Function runs and :func:`status` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["build", "enabled", "extension", "launch_counts", "status"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "eager_glue.cpp"
ENV = "TRITONBN_GLUE"

_module: ModuleType | None = None
_failure: str | None = None


def enabled() -> bool:
    """Whether ``TRITONBN_GLUE`` lets the glue run (anything but ``off``)."""
    return os.environ.get(ENV, "auto").strip().lower() not in ("off", "0", "false", "no")


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonbn" / "glue"


def _name() -> str:
    """The module's name: one a torch version, Python version and source."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    torch_tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    return f"tritonbn_glue_t{torch_tag}_py{sys.version_info[0]}{sys.version_info[1]}_{digest}"


def _command(name: str, target: Path) -> list[str]:
    """The compiler call that builds the extension, with the flags torch's own
    ``cpp_extension`` uses for a CPU extension."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++, or $CXX) on PATH")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cuda_header = _triton_cuda_include()
    if cuda_header is not None:  # the driver's API, for launches made without Python
        includes.append(str(cuda_header))
    libraries = cpp_extension.library_paths()
    return [
        compiler,
        "-shared",
        "-fPIC",
        "-O2",
        "-std=c++20",
        f"-DTORCH_EXTENSION_NAME={name}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-isystem{path}" for path in includes),
        str(SOURCE),
        *(f"-L{path}" for path in libraries),
        *(f"-Wl,-rpath,{path}" for path in libraries),
        "-lc10",
        "-ltorch",
        "-ltorch_cpu",
        "-ltorch_python",
        "-ldl",
        "-o",
        str(target),
    ]


def _triton_cuda_include() -> Path | None:
    """The folder of the ``cuda.h`` that ships with Triton, if it is installed with one."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "backends" / "nvidia" / "include"
    return folder if (folder / "cuda.h").is_file() else None


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(*, quiet: bool = False) -> ModuleType:
    """The glue's module, compiled first if this torch has no build of it yet (a C++ compile).

    Raises RuntimeError, with the compiler's output or the error met, when it cannot be built or
    loaded (no compiler, a cache folder that cannot be written, a library that will not load)."""
    global _module, _failure
    if _module is not None:
        return _module
    name = _name()
    target = _cache_folder() / f"{name}.so"
    try:
        if not target.exists():
            _compile(name, target, quiet)
        module = _load(target, name)
    except (OSError, ImportError) as error:
        _failure = f"cannot build or load the C++ glue: {error}"
        raise RuntimeError(_failure) from error
    except RuntimeError as error:
        _failure = str(error)
        raise
    _module, _failure = module, None
    return module


def _compile(name: str, target: Path, quiet: bool) -> None:
    """Compile the glue into ``target``, which appears whole or not at all."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"tritonbn: compiling the C++ glue of the eager path for torch {torch.__version__} "
            f"(once, into {folder}) ...",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / target.name
        result = subprocess.run(_command(name, partial), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError("compiling the C++ glue failed:\n" + (result.stderr or result.stdout)[-4000:])
        os.replace(partial, target)  # atomic: another process sees all of it or nothing
    if not quiet:
        print(f"tritonbn: C++ glue built in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def extension() -> ModuleType | None:
    """The glue's module when the eager path may use it: built (now, the first time, unless
    ``TRITONBN_GLUE=off``) and loaded; None when it is off or cannot be built."""
    if not enabled():
        return None
    if _module is not None or _failure is not None:
        return _module
    try:
        return build()
    except RuntimeError:
        return None


def launch_counts() -> dict[str, int]:
    """Kernel launches the glue made since the process started: ``"driver"`` (``cuLaunchKernelEx``
    called by the glue itself) and ``"triton"`` (through Triton's launch function); zeros while
    it is not loaded. Launches of the Python path are ``kernels.launch.launch_counts()``."""
    if _module is None:
        return {"driver": 0, "triton": 0}
    return dict(_module.launch_counts())


def status() -> str:
    """One line: whether remembered calls run the C++ glue, and if not, why."""
    if not enabled():
        return f"off ({ENV}=off): remembered calls run the Python autograd Function"
    if _module is not None:
        return "C++ (tritonbn/csrc/eager_glue.cpp, loaded)"
    if _failure is not None:
        return f"Python autograd Function ({_failure.splitlines()[0]})"
    return "not loaded yet: built or loaded at the first remembered call on compiled kernels"


def main() -> int:
    """``python -m tritonbn.glue``: build (or find) the glue and say where it stands."""
    try:
        build()
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    print(status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
