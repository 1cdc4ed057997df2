"""Every kernel variant compiles for sm_90 with Triton's real compiler — on a machine without a
GPU, where the rest of the suite only runs the kernels through the interpreter — and the split
kernels' ticket protocol reads, in the machine code's PTX, as its memory ordering needs,
aligned runs of a tile compile to vector loads and stores, and a 16-bit tile of the statistics
kernels takes fp32's register layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.compiler")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every test compiles the kernels")
def test_every_kernel_variant_compiles_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_build.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    built = int(result.stdout.split()[1])
    assert built > 100, result.stdout


# Compiles the split kernels' variants for both tilings and prints their PTX (TRITON_INTERPRET
# unset: the test process's kernels are interpreter functions).
TICKET_PTX = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_build
from tritonbn.kernels import backward, stats

found = {}
for kernel in (stats.stats_kernel, backward.backward_sums_kernel):
    for constexprs, data_type, ones in kernel_build.variants(kernel):
        key = f"{kernel.fn.__name__} {data_type} channel-major={constexprs['CHANNEL_MAJOR']}"
        if data_type in ("fp32", "bf16") and key not in found:
            found[key] = kernel_build.build(kernel, constexprs, data_type, ones).asm["ptx"]
print(json.dumps(found))
"""


def _opcodes(ptx: str) -> list[str]:
    """The opcode of each PTX instruction in order (``atom.global.gpu.acq_rel.add.u32``, say),
    predicated ones included; directives, labels, comments and debug locations left out."""
    opcodes = []
    for line in ptx.splitlines():
        words = line.split("//")[0].split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words and not words[0].startswith((".", "$", "{", "}")):
            opcodes.append(words[0])
    return opcodes


def _compiled_report(script: str) -> object:
    """Run ``script`` (one of this file's compiling scripts, given tests/ as its argv[1]) in a
    process where the kernels compile (TRITON_INTERPRET unset); the JSON of its last line."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU test_deterministic_bits runs the protocol")
def test_the_ticket_protocol_in_ptx():
    # Each program stores its partials, all its threads meet at a barrier, one thread draws the
    # ticket with a GPU-scope acquire-release atomic add on the int32 counter and shares it
    # through a barrier, and only then are partials read, coherently (no ld.global.nc). The
    # interpreter runs programs one at a time, so only the compiled code can show this.
    variants = _compiled_report(TICKET_PTX)
    assert len(variants) == 6, sorted(variants)  # fp32 in both tilings, bf16 in one, per kernel
    for name, ptx in variants.items():
        code = _opcodes(ptx)
        atomics = [i for i, opcode in enumerate(code) if opcode.startswith(("atom.", "red."))]
        assert [code[i] for i in atomics] == ["atom.global.gpu.acq_rel.add.u32"], name
        (at,) = atomics
        last_store = max(i for i, opcode in enumerate(code[:at]) if opcode.startswith("st.global"))
        assert "bar.sync" in code[last_store:at], name
        first_load = next(i for i, opcode in enumerate(code) if i > at and opcode.startswith("ld.global"))
        assert "bar.sync" in code[at:first_load], name
        assert not any(opcode.startswith("ld.global.nc") for opcode in code), name


# Compiles the normalize kernel, fp32, data pointers 16-byte aligned, unit stride along k and
# the other integer arguments of no known divisibility (as S = 196 gives), with ALIGN 1 and 4;
# prints the vector loads and stores of each.
VECTOR_PTX = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_build
from tritonbn.kernels import normalize

kernel = normalize.normalize_kernel
base = next(c for c, data_type, ones in kernel_build.variants(kernel) if data_type == "fp32" and ones)
found = {}
for channel_major in (True, False):
    for align in (1, 4):
        constexprs = dict(base, CHANNEL_MAJOR=channel_major, ALIGN=align)
        ptx = kernel_build.build(kernel, constexprs, "fp32", ("stride_k",), aligned=True).asm["ptx"]
        found[f"channel-major={channel_major} ALIGN={align}"] = [
            ptx.count("ld.global.v4"), ptx.count("st.global.v4")
        ]
print(json.dumps(found))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every test compiles the kernels")
def test_aligned_runs_compile_to_vector_loads():
    # Triton says only which integer arguments are multiples of 16: with ALIGN = 4 the tiles'
    # 16-byte runs must still load and store as ld/st.global.v4 (tiling.tile_offsets), and
    # without it (ALIGN = 1) they cannot.
    counts = _compiled_report(VECTOR_PTX)
    for name, (loads, stores) in counts.items():
        if name.endswith("ALIGN=4"):
            assert loads > 0 and stores > 0, (name, counts)
        else:
            assert loads == 0 and stores == 0, (name, counts)


# Compiles the kernels that keep [BLOCK_K] vectors of column statistics or sums (the split
# statistics and backward sums in both tilings, the fused kernels in the column tiling) with rows
# in aligned runs of 8 (ALIGN = 8, unit stride along k, data pointers 16-byte aligned), in fp32,
# bf16 and fp16; prints each one's distributed layouts (the TTGIR's #blocked attributes).
LAYOUT_TTGIR = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_build
from tritonbn.kernels import backward, fused_small, stats

found = {}
for kernel, channel_major in (
    (stats.stats_kernel, True),
    (stats.stats_kernel, False),
    (backward.backward_sums_kernel, True),
    (backward.backward_sums_kernel, False),
    (fused_small.fused_forward_kernel, False),
    (fused_small.fused_backward_kernel, False),
):
    base = next(c for c, data_type, ones in kernel_build.variants(kernel) if data_type == "bf16")
    constexprs = dict(base, CHANNEL_MAJOR=channel_major, ALIGN=8)
    for data_type in ("fp32", "bf16", "fp16"):
        ttgir = kernel_build.build(kernel, constexprs, data_type, ("stride_k",), aligned=True).asm["ttgir"]
        layouts = sorted(line for line in ttgir.splitlines() if line.startswith("#blocked"))
        found.setdefault(f"{kernel.fn.__name__} channel-major={channel_major}", {})[data_type] = layouts
print(json.dumps(found))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every test compiles the kernels")
def test_half_tiles_take_the_fp32_layout():
    # Laid out by its widest vector, a 16-bit tile holds 8 elements of a row a thread, and each
    # column-statistics vector reduced from it 8 values a thread where fp32's holds 4: 111
    # registers a thread against 64 in the split statistics kernel (sm_90, Triton 3.8).
    # tiling.tile_pointers reads it 4 at a time, so that after the cast to fp32 the kernel is
    # the fp32 one, layouts and reduction order included.
    found = _compiled_report(LAYOUT_TTGIR)
    assert len(found) == 6, sorted(found)
    for name, layouts in found.items():
        assert any("sizePerThread = [1, 4]" in line for line in layouts["fp32"]), (name, layouts["fp32"])
        assert layouts["bf16"] == layouts["fp32"], (name, layouts)
        assert layouts["fp16"] == layouts["fp32"], (name, layouts)
