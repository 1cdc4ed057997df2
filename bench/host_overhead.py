"""Host time per BatchNorm layer: what a user waits for in eager mode when the GPU work is short.

    python bench/host_overhead.py [--json OUT] [--repeats 9] [--steps 40] [--compiled] [--layers LAYER ...]

For each LeNet BatchNorm layer (and conv2 in channels_last), a chain of 8 layers is run forward
and backward; the host time per layer is the best of ``--repeats`` timings of ``--steps`` steps,
divided by 8, tritonbn's and torch's timings taken in turns. tritonbn runs its Triton path (the
default on a GPU; ``tritonbn.backend("triton")`` under the stand-in driver), torch its own
``nn.BatchNorm``.

* On a CUDA machine: real tensors of the layer's shape, wall-clock over the loop, synchronized
  once at its end (so the GPU time of a layer is hidden whenever the host is slower).
* Without CUDA: the script re-runs itself with a stand-in CUDA driver (``standin_cuda.py``), so
  Triton compiles the kernels for sm_90 and goes through its real launch path on CPU tensors of
  the layer's shape; nothing executes. torch's layer runs its CPU kernel on a tiny tensor of the
  same rank and channels, which is its host time plus a few microseconds of arithmetic. A real
  driver adds its own time to each of tritonbn's launches. The child process keeps freed memory
  (``GLIBC_TUNABLES``: no trimming, no mmap below 32 MiB), as CUDA's caching allocator does:
  otherwise every layer-sized CPU output would cost a round trip to the kernel's memory
  manager (about 8 µs a layer here) that no GPU run pays.

Besides the layers alone, the "+ sigmoid" rows time the LeNet block as each library runs it:
tritonbn's BatchNorm with the activation fused (``activation="sigmoid"``), torch's BatchNorm then
``nn.Sigmoid``.

With ``--compiled`` it also times tritonbn's chain through ``torch.compile`` in its default mode
(no CUDA graphs: the compiled graph calls tritonbn's ops, and their host time is paid at every
call), compiled anew for each layer; on CUDA torch's chain too. ``--layers`` times only the named
rows (``LAYERS``' keys, one argument each).

It also counts the kernel launches of each pass and splits one forward into its parts. The
results go to stdout and, with ``--json``, into a file that ``bench/render_benchmarks.py`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import standin_cuda  # noqa: E402  (the bench folder is not a package)

# name: (module class name, shape, channels_last, activation)
LAYERS = {
    "conv1 (256,6,24,24)": ("BatchNorm2d", (256, 6, 24, 24), False, None),
    "conv2 (256,16,8,8)": ("BatchNorm2d", (256, 16, 8, 8), False, None),
    "conv2 channels_last": ("BatchNorm2d", (256, 16, 8, 8), True, None),
    "fc1 (256,120)": ("BatchNorm1d", (256, 120), False, None),
    "fc2 (256,84)": ("BatchNorm1d", (256, 84), False, None),
    "conv1 + sigmoid": ("BatchNorm2d", (256, 6, 24, 24), False, "sigmoid"),
    "conv2 + sigmoid": ("BatchNorm2d", (256, 16, 8, 8), False, "sigmoid"),
    "fc1 + sigmoid": ("BatchNorm1d", (256, 120), False, "sigmoid"),
    "fc2 + sigmoid": ("BatchNorm1d", (256, 84), False, "sigmoid"),
}
CHAIN = 8
STAND_IN_FLAG = "TRITONBN_HOST_OVERHEAD_STAND_IN"
# Keep freed memory in the process, as CUDA's caching allocator does (see the docstring).
CACHING_MALLOC = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=33554432"


def _ours(
    class_name: str, channels: int, activation: str | None, device: torch.device
) -> torch.nn.Sequential:
    import tritonbn

    module_class = getattr(tritonbn, class_name)
    return torch.nn.Sequential(*(module_class(channels, activation=activation) for _ in range(CHAIN))).to(
        device
    )


def _theirs(
    class_name: str, channels: int, activation: str | None, device: torch.device
) -> torch.nn.Sequential:
    module_class = getattr(torch.nn, class_name)
    blocks = []
    for _ in range(CHAIN):
        blocks.append(module_class(channels))
        if activation is not None:
            blocks.append(torch.nn.Sigmoid() if activation == "sigmoid" else torch.nn.ReLU())
    return torch.nn.Sequential(*blocks).to(device)


def _input(shape: tuple[int, ...], channels_last: bool, device: torch.device) -> torch.Tensor:
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


def _step(chain: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    # The input's gradient is handed over, not added to (under the stand-in driver it holds
    # whatever the allocator gave, and adding denormals would time the CPU's arithmetic).
    x.grad = None
    chain(x).backward(grad)


def _best_seconds(run: Callable[[], None], *, repeats: int, steps: int, sync: Callable[[], None]) -> float:
    """Best of ``repeats`` timings of ``steps`` calls of ``run`` (seconds a call)."""
    for _ in range(3):
        run()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def _best_pair(
    ours: Callable[[], None],
    theirs: Callable[[], None],
    *,
    repeats: int,
    steps: int,
    sync: Callable[[], None],
) -> tuple[float, float]:
    """Best of ``repeats`` timings of ``steps`` calls each of ``ours`` and ``theirs``, taken in
    turns (seconds a call): a slow spell of a shared machine hits both alike."""
    for _ in range(3):
        ours()
        theirs()
    sync()
    best_ours = best_theirs = float("inf")
    for _ in range(repeats):
        best_ours = min(best_ours, _timed(ours, steps, sync))
        best_theirs = min(best_theirs, _timed(theirs, steps, sync))
    return best_ours, best_theirs


def _on_triton(run: Callable[[], None], stand_in: bool) -> Callable[[], None]:
    """``run`` on tritonbn's Triton path: under the stand-in driver the CPU tensors need
    ``tritonbn.backend("triton")``; on a GPU the default (``auto``) is that path, and what a
    user runs."""
    if not stand_in:
        return run
    import tritonbn

    def forced() -> None:
        with tritonbn.backend("triton"):
            run()

    return forced


def _timed(run: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return (time.perf_counter() - start) / steps


def _launches(stand_in: bool) -> Callable[[], int]:
    if stand_in:
        return standin_cuda.launches
    from tritonbn import glue
    from tritonbn.kernels.launch import launch_counts

    return lambda: sum(launch_counts().values()) + sum(glue.launch_counts().values())


def _compiled_seconds(
    chain: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, stand_in: bool, **timing: object
) -> float:
    """Seconds a forward+backward step of ``torch.compile(chain)`` takes (default mode), compiled
    afresh: no earlier layer's graphs or recompile count weigh on it."""
    torch._dynamo.reset()
    compiled = torch.compile(chain)
    return _best_seconds(_on_triton(functools.partial(_step, compiled, x, grad), stand_in), **timing)


def measure(
    repeats: int, steps: int, stand_in: bool, compiled: bool = False, layers: list[str] | None = None
) -> dict[str, object]:
    """Time the ``layers`` of LAYERS (default: all); returns the results as plain data."""
    import tritonbn
    from tritonbn import glue

    device = torch.device("cpu" if stand_in else "cuda")
    if stand_in:
        torch.set_num_threads(1)  # torch's CPU layer: its host time, not a thread pool's wake-ups
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    launches = _launches(stand_in)
    rows = []
    for name in layers or LAYERS:
        class_name, shape, channels_last, activation = LAYERS[name]
        channels = shape[1]
        torch_shape = (2, channels, *([2] * (len(shape) - 2))) if stand_in else shape
        ours = _ours(class_name, channels, activation, device)
        theirs = _theirs(class_name, channels, activation, device)
        x, x_torch = _input(shape, channels_last, device), _input(torch_shape, channels_last, device)
        grad, grad_torch = torch.ones_like(x), torch.ones_like(x_torch)
        ours_s, torch_s = _best_pair(
            _on_triton(functools.partial(_step, ours, x, grad), stand_in),
            functools.partial(_step, theirs, x_torch, grad_torch),
            repeats=repeats,
            steps=steps,
            sync=sync,
        )
        timings: dict[str, float] = {}
        if compiled:
            timing = {"repeats": repeats, "steps": steps, "sync": sync}
            ours_compiled_s = _compiled_seconds(ours, x, grad, stand_in, **timing)
            timings["tritonbn_compiled_us"] = ours_compiled_s / CHAIN * 1e6
            if not stand_in:
                torch_compiled_s = _compiled_seconds(theirs, x_torch, grad_torch, False, **timing)
                timings["torch_compiled_us"] = torch_compiled_s / CHAIN * 1e6
        with tritonbn.backend("triton"):
            plan = tritonbn.explain(x.detach()).kernel
            before = launches()
            y = ours[0](x)
            forward_launches = launches() - before
            y.backward(torch.ones_like(y))
            backward_launches = launches() - before - forward_launches
            breakdown = _forward_breakdown(ours[0], x.detach(), repeats, steps, sync)
        rows.append(
            {
                "layer": name,
                "shape": list(shape),
                "channels_last": channels_last,
                "activation": activation,
                "plan": plan,
                "launches_forward": forward_launches,
                "launches_backward": backward_launches,
                "tritonbn_us": ours_s / CHAIN * 1e6,
                "torch_us": torch_s / CHAIN * 1e6,
                "ratio": ours_s / torch_s,
                **timings,
                "forward_breakdown_us": breakdown,
            }
        )
    return {
        "datetime": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "what": "host time per BatchNorm layer, forward+backward, chain of 8, best of "
        f"{repeats} x {steps} steps" + ("; also through torch.compile (default mode)" if compiled else ""),
        "driver": "stand-in CUDA driver (nothing executes)" if stand_in else "CUDA",
        "allocator": f"CPU, freed memory kept (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')})"
        if stand_in
        else "CUDA caching allocator",
        "torch_input": "tiny tensor of the layer's rank and channels on the CPU"
        if stand_in
        else "the layer's shape",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "eager_path": glue.status(),
        "glue_launches": glue.launch_counts(),
        "layers": rows,
    }


def _machine(device: torch.device) -> str:
    """The GPU's name, or the CPU model and its core count."""
    from tritonbn.train import environment

    info = environment(device)
    if device.type == "cuda":
        return str(info["device_name"])
    return f"{info['device_name']}, {info['cpu_count']} cores"


def _forward_breakdown(
    module: torch.nn.Module, x: torch.Tensor, repeats: int, steps: int, sync: Callable[[], None]
) -> dict[str, float]:
    """µs of one no-grad forward, whole and by part: the module's checks and plan, and the
    kernels layer (geometry lookup, allocation, launches) called directly."""
    from tritonbn import kernels
    from tritonbn._checks import check_batch_norm_args
    from tritonbn.dispatch import select_plan, sm_count

    running_mean, running_var = module.running_mean.clone(), module.running_var.clone()
    weight, bias = module.weight.detach(), module.bias.detach()
    plan = select_plan(x, True).kernel
    sms = sm_count(x.device)

    def checks_and_plan() -> None:
        check_batch_norm_args(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        select_plan(x, True)

    def kernels_layer() -> None:
        kernels.forward_train(x, weight, bias, running_mean, running_var, 0.1, 1e-5, plan=plan, sm_count=sms)

    def whole() -> None:
        with torch.no_grad():
            module(x)

    return {
        name: _best_seconds(part, repeats=repeats, steps=steps * 4, sync=sync) * 1e6
        for name, part in (
            ("checks and plan", checks_and_plan),
            ("kernels layer", kernels_layer),
            ("module forward", whole),
        )
    }


def report(results: dict[str, object]) -> str:
    """The results as a Markdown table."""
    head = f"{results['what']}; tritonbn on the {results['driver']}, torch on {results['torch_input']}."
    if "allocator" in results:
        head += f" Allocator: {results['allocator']}."
    if "eager_path" in results:
        head += f" tritonbn's remembered calls: {results['eager_path']}."
    if "glue_launches" in results:
        counts = results["glue_launches"]
        head += (
            f" The glue's launches: {counts['driver']} through the driver itself, "
            f"{counts['triton']} through Triton's launch function."
        )
    columns = [column for column in COMPILED_COLUMNS if any(column in row for row in results["layers"])]
    lines = [
        head,
        "",
        "| layer | plan | launches fwd/bwd | tritonbn µs | torch µs | ratio |"
        + "".join(f" {COMPILED_COLUMNS[column]} |" for column in columns),
        "|---|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in results["layers"]:
        cells = "".join(f" {row[column]:.1f} |" if column in row else " — |" for column in columns)
        lines.append(
            f"| {row['layer']} | {row['plan']} | {row['launches_forward']}/{row['launches_backward']} "
            f"| {row['tritonbn_us']:.1f} | {row['torch_us']:.1f} | {row['ratio']:.2f}× |" + cells
        )
    return "\n".join(lines)


# The --compiled timings and their headers.
COMPILED_COLUMNS = {
    "tritonbn_compiled_us": "tritonbn compiled µs",
    "torch_compiled_us": "torch compiled µs",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--repeats", type=int, default=9, help="timings per layer (best is kept)")
    parser.add_argument("--steps", type=int, default=40, help="steps per timing")
    parser.add_argument(
        "--compiled", action="store_true", help="also time the chains through torch.compile (default mode)"
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="time only these rows (default: all): " + "; ".join(LAYERS),
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1")
    unknown = [name for name in args.layers or () if name not in LAYERS]
    if unknown:
        parser.error(f"--layers: unknown {unknown}; the layers are: {'; '.join(LAYERS)}")
    if os.environ.get(STAND_IN_FLAG):
        standin_cuda.install()
        results = measure(args.repeats, args.steps, True, args.compiled, args.layers)
    elif torch.cuda.is_available():
        results = measure(args.repeats, args.steps, False, args.compiled, args.layers)
    else:
        # No CUDA: rerun in a child process that loads the stand-in driver at start-up.
        return standin_cuda.rerun(
            __file__, argv or sys.argv[1:], {STAND_IN_FLAG: "1", "GLIBC_TUNABLES": CACHING_MALLOC}
        )
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
