"""A stand-in CUDA driver for timing tritonbn's host launch path on a machine without a GPU.

``standin_cuda/standin_cuda.c`` is a ``libcuda.so.1`` whose every call succeeds at once; built
with gcc against the ``cuda.h`` that ships with Triton, and found first on ``LD_LIBRARY_PATH``
(read when the process starts, so :func:`environment` is for a child process), it lets Triton
compile every kernel for sm_90 for real and go through its whole launch path — argument binding,
specialization, cache lookup, the compiled launcher, ``cuLaunchKernelEx`` — on CPU tensors.
Nothing runs: outputs are garbage, so use it to time host work and count launches, never to
check a result. A real driver adds its own time to each launch.

Each kernel the stand-in loads gets a handle of its own (1, 2, ... in load order), and it keeps a
log of launches for tests that compare what two launch paths hand the driver: ``standin_log(1)``
empties and starts it, ``standin_param_sizes(handle, sizes, count)`` says how many parameters of
which sizes a kernel takes (from its PTX), and ``standin_logged()`` / ``standin_logged_launch(i)``
read it (``struct standin_launch`` in the C file; ``tests/test_glue.py`` reads it with ctypes).
``standin_capture(stream, 1)`` makes ``cuStreamIsCapturing`` answer that ``stream`` is being
captured into a CUDA graph, ``standin_capture(stream, 0)`` that no stream is.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "standin_cuda" / "standin_cuda.c"
LIBRARY = "libcuda.so.1"

_library: ctypes.CDLL | None = None


def build(folder: Path) -> Path:
    """Compile the stand-in into ``folder`` (if its source is newer) and return ``folder``."""
    from tritonbn.glue import _triton_cuda_include  # where the glue finds the same header

    if shutil.which("gcc") is None:
        raise RuntimeError("building the stand-in CUDA driver needs gcc")
    include = _triton_cuda_include()
    if include is None:
        raise RuntimeError("building the stand-in CUDA driver needs the cuda.h that ships with Triton")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / LIBRARY
    if not target.exists() or target.stat().st_mtime < SOURCE.stat().st_mtime:
        subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", f"-I{include}", str(SOURCE), "-o", str(target)],
            check=True,
        )
    link = folder / "libcuda.so"
    if not link.exists():
        link.symlink_to(LIBRARY)
    return folder


def environment(folder: Path) -> dict[str, str]:
    """The environment of a child process that loads the stand-in built in ``folder``."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(folder), env.get("LD_LIBRARY_PATH")]))
    env["TRITON_LIBCUDA_PATH"] = str(folder)
    env.pop("TRITON_INTERPRET", None)
    return env


def rerun(script: str, argv: Sequence[str], extra_env: dict[str, str]) -> int:
    """Run ``script`` again, with ``argv``, in a child process that loads the stand-in (built in
    the temporary folder) at start-up, ``extra_env`` added to its environment (a flag telling the
    child to :func:`install` it, say); the child's exit status. For scripts that time or compile
    the kernels on a machine without CUDA."""
    folder = build(Path(tempfile.gettempdir()) / "tritonbn-standin-cuda")
    env = environment(folder) | extra_env
    return subprocess.run([sys.executable, script, *argv], env=env).returncode


def install() -> None:
    """Make the stand-in Triton's active driver; call before the first launch, in a process
    started with :func:`environment`."""
    global _library
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import driver as nvidia

    folder = os.environ.get("TRITON_LIBCUDA_PATH", "")
    library = ctypes.CDLL(os.path.join(folder, LIBRARY))
    if not hasattr(library, "standin_launch_count"):
        raise RuntimeError(f"{folder}/{LIBRARY} is not the stand-in driver")
    library.standin_launch_count.restype = ctypes.c_long
    _library = library

    class StandInDriver(nvidia.CudaDriver):
        """Triton's CUDA driver, asking nothing of torch.cuda (there is no CUDA here)."""

        def __init__(self) -> None:
            self.utils = nvidia.CudaUtils()
            self.launcher_cls = nvidia.CudaLauncher
            self.get_device_capability = lambda device=0: (9, 0)
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.set_current_device = lambda device: None

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

        @staticmethod
        def is_active() -> bool:
            return True

    triton.runtime.driver.set_active(StandInDriver())


def launches() -> int:
    """Kernel launches that reached the stand-in since the process started."""
    if _library is None:
        raise RuntimeError("install() the stand-in driver first")
    return int(_library.standin_launch_count())
