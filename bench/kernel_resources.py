"""Registers and register spills of the kernels tritonbn launches on LeNet's layers, per fused
activation, as compiled for the GPU — measurable without one.

    python bench/kernel_resources.py [--json FILE]

For each LeNet BatchNorm layer (``LAYERS``) and each activation (none, then every fused one), a
training step (forward and the gradients of input, weight and bias) and an eval forward run on
the Triton backend with the dispatcher's own plan; the compiled kernels they launch
(``tritonbn.tune.launched_kernels``) are read from their cubin by ``tritonbn.tune.kernel_resources``:
registers a thread, spill bytes a thread (stack and local memory) and shared memory. A spill is
local memory traffic on every use of the spilled value, which is what decides whether a plan's
tile is too large for an activation's extra live values.

On a GPU the kernels compile for it. Without CUDA the script re-runs itself under the stand-in
CUDA driver (``standin_cuda.py``): Triton compiles every kernel for sm_90 for real and launches
nothing, which is all this needs. The first run compiles each variant (minutes on a small CPU);
Triton's cache makes later runs quick.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import standin_cuda  # noqa: E402  (the bench folder is not a package)
from report import markdown_table  # noqa: E402

# name: input shape (LeNet with BatchNorm at batch size 256, as the seed notebook trains it).
LAYERS = {
    "conv1": (256, 6, 24, 24),
    "conv2": (256, 16, 8, 8),
    "fc1": (256, 120),
    "fc2": (256, 84),
}
STAND_IN_FLAG = "TRITONBN_RESOURCES_STAND_IN"


def _step(shape: tuple[int, ...], activation: str | None, training: bool, device: torch.device):
    """A function running one call of ``tritonbn.batch_norm`` on the Triton backend (training: and
    the gradients of input, weight and bias), and its input."""
    import tritonbn

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    x.requires_grad_(training)
    weight = torch.ones(shape[1], device=device, requires_grad=training)
    bias = torch.zeros(shape[1], device=device, requires_grad=training)
    mean, var = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)

    def step() -> None:
        with tritonbn.backend("triton"):
            y = tritonbn.batch_norm(x, mean, var, weight, bias, training, activation=activation)
        if training:
            torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))

    return step, x


def measure(device: torch.device) -> dict[str, object]:
    """Every (layer, activation, mode)'s plan and its kernels' resources."""
    import triton

    import tritonbn
    from tritonbn.kernels.activation import ACTIVATIONS
    from tritonbn.tune import kernel_resources, launched_kernels

    rows = []
    for layer, shape in LAYERS.items():
        for activation in (None, *ACTIVATIONS):
            for training in (True, False):
                step, x = _step(shape, activation, training, device)
                plan = tritonbn.explain(x.detach(), training=training, backend="triton").kernel
                for kernel in launched_kernels(step):
                    rows.append(
                        {
                            "layer": layer,
                            "shape": list(shape),
                            "activation": activation,
                            "mode": "train" if training else "eval",
                            "plan": str(plan),
                            "kernel": kernel.name,
                            "num_warps": int(kernel.metadata.num_warps),
                            **kernel_resources(kernel),
                        }
                    )
    on_gpu = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if on_gpu else "stand-in CUDA driver, sm_90",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "kernels": rows,
    }


# The report's columns: the row's key and its heading.
COLUMNS = {
    "layer": "layer",
    "activation": "activation",
    "mode": "mode",
    "plan": "plan",
    "kernel": "kernel",
    "num_warps": "warps",
    "registers": "registers",
    "spill_bytes": "spill bytes",
    "shared": "shared bytes",
}


def report(results: dict[str, object]) -> str:
    """A Markdown table of ``results``: one row per compiled kernel."""
    head = (
        f"kernel resources on {results['device']}, {results['date']} "
        f"(torch {results['versions']['torch']}, triton {results['versions']['triton']})"
    )
    rows = [["—" if row[key] is None else str(row[key]) for key in COLUMNS] for row in results["kernels"]]
    return head + "\n\n" + markdown_table(list(COLUMNS.values()), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if os.environ.get(STAND_IN_FLAG):
        standin_cuda.install()
        results = measure(torch.device("cpu"))
    elif torch.cuda.is_available():
        results = measure(torch.device("cuda"))
    else:
        # No CUDA: rerun in a child process that loads the stand-in driver at start-up.
        return standin_cuda.rerun(__file__, argv or sys.argv[1:], {STAND_IN_FLAG: "1"})
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
