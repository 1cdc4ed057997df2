"""Facts about the Triton runtime the kernels were built for, and fixes for the Triton versions
tritonbn supports. Importable without Triton: ``TRITON_MISSING`` then says why the kernels cannot
run.

``interpreted()`` tells whether ``@triton.jit`` produced interpreter functions (TRITON_INTERPRET=1
was set before the kernels were imported). ``patch_interpreter`` mends Triton 3.6's interpreter
under NumPy >= 2.4, where a loop bound passed as a kernel argument raises "only 0-dimensional
arrays can be converted to Python scalars" (Triton issue 9171, fixed in later releases).
"""

from __future__ import annotations

import inspect

try:
    import triton
    import triton.language as tl
except ImportError as error:  # no Triton wheel for this platform: the CPU fallback serves
    triton = None
    TRITON_MISSING = f"Triton is not installed ({error})"
else:
    TRITON_MISSING = None

if triton is not None:

    @triton.jit
    def _probe_kernel(x_ptr):
        # Never launched: its type tells how @triton.jit built this package's kernels.
        tl.store(x_ptr, 0)

    _INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


_driver_takes_cpu_tensors = False


def launches_cpu_tensors() -> bool:
    """Whether the kernels launch on CPU tensors: under the interpreter, or where Triton's active
    driver is a stand-in on a machine without CUDA (``bench/standin_cuda.py``, which times the
    host launch path; its outputs are garbage)."""
    global _driver_takes_cpu_tensors
    if _INTERPRETED or _driver_takes_cpu_tensors:
        return True
    if triton is None:
        return False
    import torch

    if torch.cuda.is_available():
        return False
    try:
        from triton.runtime import driver

        driver.active.get_current_target()
    except Exception:  # no active Triton driver: Triton raises RuntimeError, or its own errors
        return False
    _driver_takes_cpu_tensors = True
    return True


def stand_in_sm_count() -> int:
    """Multiprocessors of the device the active Triton driver reports (the stand-in's)."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(0)["multiprocessor_count"]


def _numpy_refuses_sized_scalars() -> bool:
    import numpy as np  # the interpreter's own dependency; compiled kernels never need it

    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def patch_interpreter() -> bool:
    """Make the interpreter's scalar arguments usable as Python integers where this Triton's
    interpreter converts them with ``int(array)``, which NumPy >= 2.4 refuses for 1-element arrays.

    A no-op (False) when the kernels are compiled, when NumPy still converts, or when Triton has
    the fix; otherwise wraps the interpreter's tensor patching once and returns True.
    """
    if not _INTERPRETED or not _numpy_refuses_sized_scalars():
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "tritonbn_fixed", False):
        return True
    if "int(self.handle.data)" not in inspect.getsource(original):
        return False

    def patch_lang_tensor(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.tritonbn_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


patch_interpreter()
