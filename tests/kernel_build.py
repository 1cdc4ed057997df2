"""Compile every Triton kernel for an NVIDIA GPU without one: Triton's own compiler down to a
cubin for sm_90 (H100), over the constexpr variants the launchers use.

The interpreter runs the kernels' Python semantics; the compiler is stricter (types of values
returned from different branches, constexpr control flow, casts), so a kernel can pass every
interpreter test and still fail to build on a GPU. Run as a script with TRITON_INTERPRET unset:
``python tests/kernel_build.py`` prints the number of variants built, or raises on the first one
that fails. tests/test_kernel_build.py runs it in CI.
"""

from __future__ import annotations

import itertools
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonbn.kernels import backward, fused_small, normalization, normalize, stats
from tritonbn.kernels.activation_table import ACTIVATIONS

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"eps", "slope", "momentum", "count"}
DATA_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "residual_ptr", "dres_ptr"}
# Integer pointers (the others point to fp32 parameters, statistics and partials): the ticket
# counters (int32, workspace.py) and num_batches_tracked.
INTEGER_POINTERS = {"ticket_ptr": "*i32", "counter_ptr": "*i64"}
# Which pointers a constexpr flag switches off (the launchers pass None for them).
OPTIONAL_POINTERS = {
    "HAS_WEIGHT": ("weight_ptr",),
    "HAS_BIAS": ("bias_ptr",),
    "HAS_RUNNING": ("running_mean_ptr", "running_var_ptr"),
    "HAS_COUNTER": ("counter_ptr",),
    "NEEDS_INPUT": ("dx_ptr",),
    "NEEDS_WEIGHT": ("grad_weight_ptr",),
    "NEEDS_BIAS": ("grad_bias_ptr",),
    "NEEDS_COEF": ("coef_ptr",),
    "TRAINING": ("coef_ptr",),
    "HAS_RESIDUAL": ("residual_ptr",),
    "NEEDS_RESIDUAL": ("dres_ptr",),
}
BLOCKS = {"BLOCK_R": 16, "BLOCK_K": 64, "BLOCK_C": 128}
# Constexprs with more than two values, and the values to build (code 0 is no activation).
CHOICES = {
    "ACTIVATION": range(len(ACTIVATIONS) + 1),
    "ALIGN": (1, 4),
    "STATS": (normalization.RUNNING, normalization.SAVED, normalization.FOLDED),
}
KERNELS = (
    stats.stats_kernel,
    normalize.normalize_kernel,
    backward.backward_sums_kernel,
    backward.backward_dx_kernel,
    fused_small.fused_forward_kernel,
    fused_small.fused_backward_kernel,
)


def build(
    kernel: triton.JITFunction,
    constexprs: dict[str, object],
    data_type: str,
    ones: tuple[str, ...] = (),
    *,
    aligned: bool = False,
) -> triton.compiler.CompiledKernel:
    """Compile ``kernel`` for TARGET with ``constexprs``; the int arguments named in ``ones`` are 1,
    which Triton's launcher turns into constants (as it does for a unit stride); with ``aligned``
    the data pointers are 16-byte aligned, as Triton specializes a fresh tensor's. Returns the
    compiled kernel; raises on a compiler error."""
    absent = {
        ptr for flag, ptrs in OPTIONAL_POINTERS.items() if constexprs.get(flag) is False for ptr in ptrs
    }
    if constexprs.get("STATS", normalization.RUNNING) != normalization.RUNNING:
        absent.add("var_ptr")
    signature: dict[str, str] = {}
    values: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            values[name] = constexprs[name]
        elif name in ones:
            signature[name] = "constexpr"
            values[name] = 1
        elif name in absent:
            signature[name] = "constexpr"
            values[name] = None
        elif name.endswith("_ptr"):
            signature[name] = (
                f"*{data_type}" if name in DATA_POINTERS else INTEGER_POINTERS.get(name, "*fp32")
            )
            if aligned and name in DATA_POINTERS:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if constexprs.get("INT64") else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=attrs)
    return triton.compile(source, target=TARGET)


def variants(kernel: triton.JITFunction) -> list[tuple[dict[str, object], str, tuple[str, ...]]]:
    """One-factor-at-a-time around two bases (every flag on, every flag off), for both tilings,
    every activation, and half data types on the all-on base; each with general strides and with
    the unit stride along the tile's contiguous axis that real launches specialize."""
    flags = [
        p.name for p in kernel.params if p.is_constexpr and p.name not in BLOCKS and p.name not in CHOICES
    ]
    blocks = {name: size for name, size in BLOCKS.items() if name in kernel.arg_names}
    choices = {name: values for name, values in CHOICES.items() if name in kernel.arg_names}
    result = []
    for base_value in (True, False):
        base = dict(blocks, **dict.fromkeys(flags, base_value))
        base.update({name: values[0] for name, values in choices.items()})
        cases = [base] + [dict(base, **{flag: not base_value}) for flag in flags]
        cases += [dict(base, **{name: value}) for name, values in choices.items() for value in values[1:]]
        result += [(case, "fp32") for case in cases]
        if base_value:
            result += [(base, "fp16"), (base, "bf16")]
    strides = [()] + ([("stride_k",)] if "stride_k" in kernel.arg_names else [])
    unique = {
        (tuple(sorted(case.items())), dtype, ones): (case, dtype, ones)
        for case, dtype in result
        for ones in strides
    }
    return list(unique.values())


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_build.py compiles real kernels: unset TRITON_INTERPRET")
    count = 0
    for kernel, (constexprs, data_type, ones) in itertools.chain.from_iterable(
        ((kernel, variant) for variant in variants(kernel)) for kernel in KERNELS
    ):
        try:
            build(kernel, constexprs, data_type, ones)
        except Exception as error:
            raise SystemExit(f"{kernel.fn.__name__} {data_type} {constexprs} {ones}: {error}") from error
        count += 1
    print(f"built {count} kernel variants for sm_{TARGET.arch}")
    return count


if __name__ == "__main__":
    main()
