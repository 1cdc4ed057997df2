"""``tritonbn-train``: the seed notebook's Fashion-MNIST experiment (LeNet with batch normalization,
Adam, lr 0.001, batch 256, 5 epochs) on tritonbn, printing the notebook's per-epoch lines.

Each run lives in a folder holding ``metrics.json`` (configuration, versions, device, tritonbn's
dispatch plan per BatchNorm layer, per-epoch metrics), ``curves.png`` and ``checkpoint.pt``, all
rewritten atomically after every epoch; ``--resume`` continues a run bit for bit on the CPU.
``--compile`` trains through ``torch.compile`` (CUDA graphs on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .convert import convert
from .data import FashionMNISTError, FashionMNISTTensors, atomic_target, load_fashion_mnist
from .dispatch import backend as tritonbn_backend
from .dispatch import explain
from .models import LeNet
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "TrainConfig",
    "TrainingError",
    "build_parser",
    "compile_model",
    "environment",
    "epoch_line",
    "evaluate",
    "main",
    "plot_curves",
    "train_epoch",
]

BN_CHOICES = ("tritonbn", "torch", "reference")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVES = "curves.png"
FORMAT = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, the status of a Unix tool whose reader went away
INT64_MAX = 2**63 - 1
# torch.manual_seed's range: negative seeds are taken modulo 2^64.
SEED_RANGE = (-(2**63), 2**64 - 1)


class TrainingError(RuntimeError):
    """A run cannot start or continue: bad options, an unusable run folder or checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What decides a run's numbers (together with the device)."""

    epochs: int = 5
    batch_size: int = 256
    lr: float = 0.001
    bn: str = "tritonbn"
    seed: int = 0
    limit: int | None = None
    fuse: bool = False
    compile: bool = False


def _int_in(minimum: int, maximum: int = INT64_MAX):
    """An argparse type: an integer written in decimal digits, from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from {minimum} to {maximum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _folder(text: str) -> Path:
    """An argparse type for ``--data-dir``: an existing folder."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, got the file {text!r}")
    return path


def _run_folder(text: str) -> Path:
    """An argparse type for ``--out``: a folder that exists or can be created, and is writable.
    Checked by creating (and at once removing) a temporary file in the nearest existing folder,
    so nothing is left behind and the answer holds for root and read-only file systems too."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, got the file {text!r}")
    if path.is_symlink() and not path.exists():
        raise argparse.ArgumentTypeError(f"expected a folder, got {text!r}, a symbolic link to nothing")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot write the run folder {text!r}: {existing} is not writable ({exc.strerror or exc})"
        ) from None
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tritonbn-train`` / ``python -m tritonbn.train``."""
    parser = argparse.ArgumentParser(
        prog="tritonbn-train",
        description="Train the seed notebook's LeNet with batch normalization on Fashion-MNIST and "
        "print its per-epoch lines (loss, train acc, test acc, time).",
        epilog="Fashion-MNIST is looked for in --data-dir, $TRITONBN_DATA, the cache "
        "($XDG_CACHE_HOME/tritonbn or ~/.cache/tritonbn), Debian's /usr/share/datasets/fashion-mnist "
        "(apt-get install dataset-fashion-mnist), then downloaded by torchvision. Exit status 130 "
        "after Ctrl-C, with the last finished epoch saved for --resume.",
    )
    defaults = TrainConfig()
    parser.add_argument(
        "--epochs",
        type=_int_in(1),
        default=None,
        help=f"total number of epochs (default {defaults.epochs}; with --resume, the "
        "checkpoint's total, and a larger value trains further)",
    )
    parser.add_argument(
        "--batch-size",
        type=_int_in(2),
        default=None,
        help=f"images per batch (default {defaults.batch_size})",
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=None, help=f"Adam learning rate (default {defaults.lr})"
    )
    parser.add_argument(
        "--bn",
        choices=BN_CHOICES,
        default=None,
        help="BatchNorm of the LeNet: tritonbn's modules on its automatic dispatcher "
        "(default; on a CPU they call PyTorch's own kernel), torch.nn's modules, or "
        "tritonbn's modules forced onto its plain-torch reference implementation",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (default auto: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--data-dir",
        type=_folder,
        default=None,
        help="folder with the four Fashion-MNIST idx files (plain or .gz, or "
        "torchvision's <dir>/FashionMNIST/raw)",
    )
    parser.add_argument(
        "--out",
        type=_run_folder,
        default=None,
        help="run folder for metrics.json, curves.png and checkpoint.pt (default a new "
        "runs/<date>-<time>-<bn> folder)",
    )
    parser.add_argument(
        "--seed",
        type=_int_in(*SEED_RANGE),
        default=None,
        help=f"seed of the weight initialization and of the shuffling (default {defaults.seed})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (same options as that run)",
    )
    parser.add_argument(
        "--fuse",
        action="store_const",
        const=True,
        default=None,
        help="fold each BatchNorm -> Sigmoid pair into one tritonbn module with the "
        "sigmoid fused into its kernels (tritonbn.convert(fuse_activations=True); "
        "not with --bn torch)",
    )
    parser.add_argument(
        "--compile",
        action="store_const",
        const=True,
        default=None,
        help="train through torch.compile, so that each step runs as compiled graphs "
        "(on CUDA with mode='reduce-overhead': CUDA graphs, one host launch a step; on "
        "the CPU the default mode); the first steps of each batch shape compile",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel training under torchrun (DistributedDataParallel, "
        "tritonbn.SyncBatchNorm; gloo on CPU, NCCL on CUDA): each global batch of "
        "--batch-size images is split across the processes, and rank 0 prints and "
        "saves, e.g. torchrun --nproc_per_node=2 -m tritonbn.train --distributed",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no notes on stderr; the per-epoch lines still print",
    )
    parser.add_argument("--limit", type=_int_in(2), default=None, help=argparse.SUPPRESS)
    return parser


def resolve_config(args: argparse.Namespace, saved: dict[str, object] | None) -> TrainConfig:
    """The run's configuration: options given, else the checkpoint's (when resuming), else defaults.

    A resumed run may only raise ``epochs``; any other option that differs from the checkpoint's
    raises :class:`TrainingError`.
    """
    values: dict[str, object] = {}
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name)
        if saved is None:
            values[field.name] = field.default if given is None else given
        elif given is None or field.name == "epochs":
            values[field.name] = saved.get(field.name, field.default) if given is None else given
        elif given != saved.get(field.name, field.default):
            option = "--" + field.name.replace("_", "-")
            raise TrainingError(
                f"the checkpoint was trained with {option} {saved.get(field.name, field.default)}, "
                f"got {option} {given}; "
                "drop the option to resume, or start a new run with another --out"
            )
        else:
            values[field.name] = given
    return TrainConfig(**values)


def resolve_device(name: str) -> torch.device:
    """``auto`` is ``cuda`` when a GPU is usable, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available to this PyTorch")
    return torch.device(name)


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process sits in a data-parallel run: rank ``rank`` of ``world_size`` (0 of 1
    without ``--distributed``). Each global batch is cut into ``world_size`` contiguous shards."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    backend: str | None = None  # the process group's backend; None when not distributed

    @property
    def main(self) -> bool:
        """Whether this process prints, writes the run folder and saves checkpoints."""
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the global batch ``index``."""
        if self.backend is None:
            return index
        return index.tensor_split(self.world_size)[self.rank]

    def sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the ranks, in place (nothing to do in a single process)."""
        if self.backend is not None:
            for tensor in tensors:
                dist.all_reduce(tensor)


def start_ranks(device_name: str, distributed: bool) -> Ranks:
    """The single process, or (``distributed``) this process's place in torchrun's group, which it
    joins: NCCL with one GPU per local rank on CUDA, gloo on the CPU."""
    if not distributed:
        return Ranks(resolve_device(device_name))
    missing = [
        name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        raise TrainingError(
            f"--distributed: {', '.join(missing)} not set; start the processes with torchrun, e.g. "
            "torchrun --nproc_per_node=2 -m tritonbn.train --distributed"
        )
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return Ranks(device, dist.get_rank(), dist.get_world_size(), backend)


def check_distributed(config: TrainConfig, device_name: str) -> None:
    """What a ``--distributed`` run cannot do, refused before the process group starts or any
    data is loaded (torchrun's WORLD_SIZE gives the number of processes; :func:`start_ranks`
    names what is missing without torchrun)."""
    world = os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and config.batch_size < 2 * int(world):
        raise TrainingError(
            f"--batch-size {config.batch_size} over {world} processes: each process needs at least 2 "
            f"images a step (an empty shard has no loss); use --batch-size {2 * int(world)} or more"
        )
    if config.bn == "torch" and resolve_device(device_name).type != "cuda":
        raise TrainingError(
            "--distributed --bn torch needs CUDA: torch.nn.SyncBatchNorm has no "
            "CPU implementation (tritonbn.SyncBatchNorm has: use --bn tritonbn)"
        )


def prepare_model(model: nn.Module, config: TrainConfig, ranks: Ranks) -> nn.Module:
    """``model`` as trained: BatchNorm -> activation pairs fused (``--fuse``), and for a
    distributed run its BatchNorms synchronized and the whole wrapped in DistributedDataParallel.
    The returned module's ``state_dict`` keys may differ; checkpoints keep ``model``'s."""
    if config.fuse:
        convert(model, fuse_activations=True)
    if ranks.backend is None:
        return model
    if config.bn == "torch":  # on CUDA only: check_distributed refused the CPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = convert_sync_batchnorm(model)
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def compile_mode(device: torch.device) -> str:
    """``torch.compile``'s mode for ``--compile``: CUDA graphs on CUDA, the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_model(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` through ``torch.compile`` (:func:`compile_mode`): forward and backward of a step run
    as compiled graphs; parameters, buffers and state_dict stay those of ``net``."""
    return torch.compile(net, mode=compile_mode(device))


def bn_backend(bn: str) -> contextlib.AbstractContextManager[None]:
    """The dispatcher setting of a ``--bn`` choice: ``reference`` forces tritonbn's reference backend
    (plain torch ops, differentiated by autograd, so wrapping the forward pass covers backward too)."""
    return tritonbn_backend("reference") if bn == "reference" else contextlib.nullcontext()


def as_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) images as float (N, 1, 28, 28) in [0, 1], like torchvision's ToTensor."""
    return images.unsqueeze(1).to(torch.float32).div_(255.0)


def shuffled_batches(
    count: int, batch_size: int, generator: torch.Generator, device: torch.device, min_size: int = 2
) -> list[torch.Tensor]:
    """A fresh permutation of ``range(count)`` drawn from ``generator`` (on the CPU, so CPU and CUDA
    runs see the same order), cut into index batches on ``device``; the last one may be shorter,
    and is dropped below ``min_size`` images (BatchNorm cannot normalize a single image in training
    mode, and every rank of a distributed run needs a share)."""
    order = torch.randperm(count, generator=generator).to(device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < min_size:
        batches.pop()
    return batches


def for_gradient(loss: torch.Tensor, shard: int, batch: int, world_size: int) -> torch.Tensor:
    """What a process backpropagates for its shard's mean ``loss``: DistributedDataParallel
    averages the processes' gradients, so each shard's mean is weighted by its share of the
    ``batch`` times ``world_size``, and the average is the gradient of the whole batch's mean loss,
    shards of unequal size included. ``loss`` itself where that weight is 1 (one process, or
    equal shards)."""
    weight = shard * world_size / batch
    return loss if weight == 1.0 else loss * weight


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batches: Sequence[torch.Tensor],
    progress: object | None = None,
    ranks: Ranks | None = None,
) -> tuple[float, float]:
    """One pass of Adam over the global ``batches`` (this rank trains on its shard of each);
    returns (mean over batches of the batch's mean cross-entropy, accuracy over the images seen,
    each batch counted with the weights before its step), over all ranks."""
    ranks = ranks or Ranks(images.device)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    shard_loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)  # the bar's
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    seen = torch.zeros((), dtype=torch.int64, device=images.device)
    for step, global_index in enumerate(batches, 1):
        index = ranks.shard(global_index)
        targets = labels[index]
        logits = model(as_inputs(images[index]))
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        for_gradient(loss, index.numel(), global_index.numel(), ranks.world_size).backward()
        optimizer.step()
        # This shard's part of the global batch's mean: its mean weighted by its share.
        loss_sum += loss.detach() * (index.numel() / global_index.numel())
        shard_loss_sum += loss.detach()
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += index.numel()
        if progress is not None:
            progress.update(1)
            if step % 20 == 0 or step == len(batches):
                # This process's shards (all of each batch in a single process): the all-reduce
                # that completes loss_sum comes at the end of the epoch.
                progress.set_postfix_str(
                    f"loss {shard_loss_sum.item() / step:.4f}, train acc {correct.item() / seen.item():.3f}"
                )
    ranks.sum(loss_sum, correct, seen)
    return loss_sum.item() / len(batches), correct.item() / seen.item()


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, ranks: Ranks | None = None
) -> float:
    """Accuracy of ``model`` in eval mode over all ``images`` (each rank scores a contiguous share);
    the model's mode is restored."""
    ranks = ranks or Ranks(images.device)
    share = ranks.shard(torch.arange(images.shape[0], device=images.device))
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for index in share.split(batch_size):
        logits = model(as_inputs(images[index]))
        correct += (logits.argmax(dim=1) == labels[index]).sum()
    model.train(was_training)
    ranks.sum(correct)
    return correct.item() / images.shape[0]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the state_dict (names and raw bytes): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dispatch_plans(
    model: nn.Module, bn: str, sample: torch.Tensor, world_size: int = 1
) -> dict[str, dict[str, object]]:
    """Per BatchNorm layer: its class, its input shape for ``sample`` (one process's share of a
    batch) and, for tritonbn's modules, ``tritonbn.explain``'s plan in training and in eval mode;
    a SyncBatchNorm over ``world_size`` > 1 processes trains on its synchronized path instead,
    which the dispatcher does not choose. Runs one eval-mode forward pass, which changes no
    state."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), bn_backend(bn):
            model(sample)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    plans: dict[str, dict[str, object]] = {}
    for name, x in inputs.items():
        module = model.get_submodule(name)
        entry: dict[str, object] = {
            "module": f"{type(module).__module__}.{type(module).__qualname__}",
            "input_shape": list(x.shape),
        }
        if bn == "torch":
            entry["note"] = "torch.nn module: PyTorch's own batch norm, tritonbn's dispatcher is not used"
        else:
            with bn_backend(bn):
                for mode, training in (("train", True), ("eval", False)):
                    if training and world_size > 1 and isinstance(module, SyncBatchNorm):
                        entry[mode] = _synchronized_plan(world_size)
                        continue
                    plan = explain(x, training=training)
                    entry[mode] = {
                        "backend": plan.backend,
                        "kernel": plan.kernel,
                        "reason": plan.reason,
                        "explain": str(plan),
                    }
        plans[name] = entry
    return plans


def _synchronized_plan(world_size: int) -> dict[str, object]:
    """The dispatch record of a SyncBatchNorm layer training over ``world_size`` processes."""
    reason = (
        f"tritonbn.SyncBatchNorm over {world_size} processes: per-channel moments all-gathered and "
        "merged, then normalization and backward in torch operations, not a dispatched plan"
    )
    return {"backend": "synchronized", "kernel": None, "reason": reason, "explain": reason}


def _installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, object]:
    """What a run or a benchmark ran on: device kind and name (the GPU's, or the CPU model), CPU
    count and torch's threads, Python and library versions, and on CUDA the GPU's memory, SM count,
    L2 size, CUDA runtime, cuDNN and NVIDIA driver. The CPU model and the driver come from
    ``torch.utils.collect_env`` (lscpu, nvidia-smi), None where it cannot tell."""
    from torch.utils import collect_env

    cpu_info = collect_env.get_cpu_info(collect_env.run) or ""
    cpu_name = next(
        (line.split(":", 1)[1].strip() for line in cpu_info.splitlines() if line.startswith("Model name:")),
        platform.processor() or platform.machine(),
    )
    info: dict[str, object] = {
        "device_type": device.type,
        "device_name": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _installed_version("torchvision"),
        "triton": _installed_version("triton"),
        "tritonbn": __version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=[props.major, props.minor],
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            l2_cache_mib=round(props.L2_cache_size / 2**20, 1),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=collect_env.get_nvidia_driver_version(collect_env.run),
        )
    return info


VERSION_KEYS = ("python", "torch", "torchvision", "triton", "tritonbn")


def device_description(env: dict[str, object]) -> dict[str, object]:
    """metrics.json's ``device``: :func:`environment` without the versions, keys without ``device_``."""
    return {key.removeprefix("device_"): value for key, value in env.items() if key not in VERSION_KEYS}


def versions(env: dict[str, object] | None = None) -> dict[str, str | None]:
    """Versions of Python and of the libraries that shape the run (from :func:`environment`)."""
    env = env if env is not None else environment(torch.device("cpu"))
    # Plain str (torch.__version__ is a TorchVersion): a checkpoint keeps them, and loads with
    # weights_only=True.
    return {key: None if env[key] is None else str(env[key]) for key in VERSION_KEYS}


def _load_average() -> float | None:
    """The 1-minute load average (other processes share the CPU, and times show it), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def save_checkpoint(path: Path, state: dict[str, object]) -> None:
    """``torch.save(state)`` to a temporary file renamed over ``path``: a reader (or a Ctrl-C)
    sees the old checkpoint or the new one, never half of one."""
    with atomic_target(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, object]:
    """The checkpoint at ``path`` (tensors on the CPU); :class:`TrainingError` if it is unusable."""
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails in pickle, zipfile or torch with varied types
        raise TrainingError(f"--resume: cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"--resume: {path} is not a tritonbn-train checkpoint of format {FORMAT}")
    return state


def write_json(path: Path, record: dict[str, object]) -> None:
    """Write ``record`` as indented JSON, atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def plot_curves(runs: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> None:
    """Loss (left) and train/test accuracy (right) per epoch of each run, as a PNG (Agg backend),
    written atomically. ``runs`` maps a label to its per-epoch records (epoch, loss, train_acc,
    test_acc)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, acc_axes = figure.subplots(1, 2)
    for index, (label, epochs) in enumerate(runs.items()):
        color = f"C{index}"
        x = [record["epoch"] for record in epochs]
        loss_axes.plot(x, [record["loss"] for record in epochs], "o-", color=color, label=label)
        acc_axes.plot(x, [record["train_acc"] for record in epochs], "o-", color=color)
        acc_axes.plot(x, [record["test_acc"] for record in epochs], "s--", color=color)
    loss_axes.set(xlabel="epoch", ylabel="training loss (cross-entropy)")
    acc_axes.set(xlabel="epoch", ylabel="accuracy")
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    # One entry a run (its colour, on the loss plot); the accuracy plot's legend explains the styles.
    loss_axes.legend(fontsize="small")
    acc_axes.legend(
        handles=[
            Line2D([], [], color="gray", marker="o", linestyle="-", label="train"),
            Line2D([], [], color="gray", marker="s", linestyle="--", label="test"),
        ],
        fontsize="small",
        loc="lower right",
    )
    if title:
        figure.suptitle(title)
    with atomic_target(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def epoch_line(record: dict[str, float]) -> str:
    """The seed notebook's per-epoch line."""
    return (
        f"epoch {record['epoch']}, loss {record['loss']:.4f}, train acc {record['train_acc']:.3f}, "
        f"test acc {record['test_acc']:.3f}, time {record['time_sec']:.1f} sec"
    )


def _default_run_dir(bn: str) -> Path:
    """``runs/<date>-<time>-<bn>``: the name a new run's folder starts from."""
    return Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{bn}"


def _claim_run_dir(bn: str) -> Path:
    """Create a new default run folder and return it: ``_default_run_dir(bn)``, or the first of
    ``-2``, ``-3``, ... after it that does not exist. Created rather than checked, so that runs
    started together never share one."""
    stem = _default_run_dir(bn)
    candidate, suffix = stem, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = stem.with_name(f"{stem.name}-{suffix}")


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) while the block runs, and deliver it after: the block runs
    whole, so the checkpoint, the history and metrics.json agree. Nothing is held back where
    signal masks do not exist (Windows) or off the main thread."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore Ctrl-C while the block runs (the report of an interrupt: a second Ctrl-C must not
    cut it short); the previous handler is restored after. Main thread only, as signals are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _rng_states(shuffle: torch.Generator, device: torch.device) -> dict[str, object]:
    states: dict[str, object] = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng_states(states: dict[str, object], shuffle: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    shuffle.set_state(states["shuffle"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[object | None]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, desc=description, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True
    ) as bar:
        yield bar


def _note(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; returns the exit status. Raises TrainingError/FashionMNISTError."""
    if args.resume and args.out is None:
        raise TrainingError("--resume needs --out RUN_DIR, the folder of the run to continue")
    saved = load_checkpoint(args.out / CHECKPOINT) if args.resume else None
    if not args.resume and args.out is not None and (args.out / CHECKPOINT).exists():
        raise TrainingError(
            f"{args.out} already holds a run; continue it with --resume or pick another --out"
        )
    config = resolve_config(args, None if saved is None else saved["config"])
    if saved is not None and config.epochs < saved["epoch"]:
        raise TrainingError(f"--epochs {config.epochs}: the checkpoint already has {saved['epoch']} epochs")
    if config.fuse and config.bn == "torch":
        raise TrainingError(
            "--fuse folds activations into tritonbn's modules: use --bn tritonbn or reference"
        )
    if saved is not None and config.epochs == saved["epoch"]:
        _note(args.quiet, f"{args.out}: already trained for {saved['epoch']} epochs, nothing to do")
        return 0
    if args.distributed:
        check_distributed(config, args.device)
    run_dir = args.out  # None: a new default folder, claimed when the run starts writing
    if run_dir is None:
        try:
            _run_folder(str(_default_run_dir(config.bn)))
        except argparse.ArgumentTypeError as exc:
            raise TrainingError(f"the default run folder: {exc}; pass --out") from None
    ranks = start_ranks(args.device, args.distributed)
    device = ranks.device
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    data: FashionMNISTTensors = load_fashion_mnist(args.data_dir, device=device, limit=config.limit)
    torch.manual_seed(config.seed)
    model = LeNet("torch" if config.bn == "torch" else "tritonbn").to(device)
    net = prepare_model(model, config, ranks)
    if config.compile:
        net = compile_model(net, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    shuffle = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, object]] = []
    sessions: list[dict[str, object]] = []
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        _restore_rng_states(saved["rng"], shuffle, device)
        history = list(saved["metrics"])
        sessions = list(saved["sessions"])
    start_epoch = len(history)
    env = environment(device)
    sessions.append(
        {
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "after_epoch": start_epoch,
            "device": str(device),
            "argv": list(args.argv),
            "versions": versions(env),
        }
    )
    record: dict[str, object] = {
        "format": FORMAT,
        # The command that started the run (this one where the checkpoint's sessions predate
        # their commands). Each session's command and versions are in "sessions"; the device,
        # versions and data below are the latest session's.
        "argv": sessions[0].get("argv", list(args.argv)),
        "config": dataclasses.asdict(config),
        "compile": {"enabled": config.compile, "mode": compile_mode(device) if config.compile else None},
        "device": device_description(env),
        "versions": versions(env),
        "data": {
            "origin": data.origin,
            "root": str(data.root),
            "verified": data.verified,
            "train_images": data.train_images.shape[0],
            "test_images": data.test_images.shape[0],
        },
        "distributed": {"world_size": ranks.world_size, "backend": ranks.backend},
        "sessions": sessions,
        "epochs": history,
        "finished": start_epoch >= config.epochs,
    }
    quiet = args.quiet or not ranks.main
    if ranks.main:
        first_batch = data.train_images[: config.batch_size]
        shard = ranks.shard(torch.arange(first_batch.shape[0], device=device))
        record["dispatch"] = dispatch_plans(model, config.bn, as_inputs(first_batch[shard]), ranks.world_size)
        if run_dir is None:
            run_dir = _claim_run_dir(config.bn)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / METRICS, record)
        print(f"training on {device.type}", flush=True)
    if ranks.backend is not None:
        _note(
            quiet,
            f"data-parallel over {ranks.world_size} processes ({ranks.backend}): "
            f"{config.batch_size} images a step in {ranks.world_size} shards",
        )
    if saved is not None:
        _note(quiet, f"resuming {run_dir} after epoch {start_epoch} of {config.epochs}")
    show_progress = not quiet and sys.stdout.isatty() and sys.stderr.isatty()

    def publish() -> None:
        record["finished"] = len(history) >= config.epochs
        write_json(run_dir / METRICS, record)
        plot_curves(
            {f"--bn {config.bn} ({device.type})": history},
            run_dir / CURVES,
            "tritonbn-train: LeNet with batch normalization on Fashion-MNIST",
        )

    # imported now, so that a Ctrl-C cannot land in a half-finished import that publish() needs later
    importlib.import_module("matplotlib.backends.backend_agg")
    in_progress: int | None = None
    try:
        with bn_backend(config.bn):
            for epoch in range(start_epoch + 1, config.epochs + 1):
                in_progress = epoch
                batches = shuffled_batches(
                    data.train_images.shape[0],
                    config.batch_size,
                    shuffle,
                    device,
                    min_size=2 * ranks.world_size,
                )
                started = time.perf_counter()
                with _progress(show_progress, len(batches), f"epoch {epoch}/{config.epochs}") as bar:
                    loss, train_acc = train_epoch(
                        net, optimizer, data.train_images, data.train_labels, batches, bar, ranks
                    )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                trained = time.perf_counter()
                test_acc = evaluate(net, data.test_images, data.test_labels, config.batch_size, ranks)
                finished = time.perf_counter()
                entry = {
                    "epoch": epoch,
                    "loss": loss,
                    "train_acc": train_acc,
                    "test_acc": test_acc,
                    "time_sec": finished - started,
                    "train_time_sec": trained - started,
                    "eval_time_sec": finished - trained,
                    "load_avg_1min": _load_average(),
                    "weights_sha256": weights_digest(model),
                }
                # A Ctrl-C lands before or after this block, never inside: the checkpoint, the
                # history and metrics.json then hold the same epochs.
                with _interrupts_deferred():
                    if ranks.main:
                        save_checkpoint(
                            run_dir / CHECKPOINT,
                            {
                                "format": FORMAT,
                                "epoch": epoch,
                                "config": dataclasses.asdict(config),
                                "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "rng": _rng_states(shuffle, device),
                                "metrics": [*history, entry],
                                "sessions": sessions,
                            },
                        )
                    history.append(entry)
                    in_progress = None
                    if ranks.main:
                        publish()
                        print(epoch_line(entry), flush=True)
    except KeyboardInterrupt:
        where = f"in epoch {in_progress}" if in_progress is not None else f"after epoch {len(history)}"
        if not ranks.main:
            return EXIT_INTERRUPTED
        with _interrupts_ignored():
            if history:
                publish()
                print(
                    f"\ninterrupted {where}: the checkpoint in {run_dir} holds epoch {len(history)}; "
                    f"continue with --resume --out {run_dir}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    f"\ninterrupted {where}: no epoch finished, nothing saved to resume",
                    file=sys.stderr,
                    flush=True,
                )
        return EXIT_INTERRUPTED
    finally:
        if ranks.backend is not None:
            # The DistributedDataParallel wrapper (and its reducer's threads) must go before the
            # process group, and every rank must get there: otherwise a rank may abort at exit.
            del net
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
    _note(quiet, f"run saved in {run_dir}: {METRICS}, {CURVES}, {CHECKPOINT}")
    return 0


TRAIN_EXTRAS = ("torchvision", "tqdm", "matplotlib")


def _missing_extras() -> list[str]:
    """The packages of the ``train`` extra that cannot be imported (the library needs none)."""
    missing = []
    for name in TRAIN_EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tritonbn-train`` and ``python -m tritonbn.train``; returns the exit status
    (0 done, 1 an error explained on stderr, 2 bad options, 130 interrupted, 141 stdout closed)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    missing = _missing_extras()
    if missing:
        print(
            f"{parser.prog}: error: the trainer needs tritonbn's train extra, missing here: "
            f"{', '.join(missing)}; install it with: pip install 'tritonbn[train]'",
            file=sys.stderr,
            flush=True,
        )
        return 1
    try:
        return run(args)
    except (TrainingError, FashionMNISTError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # before the first epoch started: there is nothing to save
        print(f"\n{parser.prog}: interrupted before training started", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read the output has gone (tritonbn-train | head): stop as Unix tools do, quietly;
        # the epoch whose line could not be printed is saved. stdout goes to devnull so that
        # Python's flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
