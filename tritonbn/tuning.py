"""Tuning tables: measured plan and tunables choices per GPU, read by the dispatcher.

A table is a JSON file written by ``tritonbn-tune`` (:mod:`tritonbn.tune`) on one GPU: for each
measured case (layout, dtype, training or eval, shape) the candidate that ran fastest — a kernel
plan with its tunables, or ``"torch"`` (PyTorch's own batch_norm) — and the timings of every
candidate behind that choice, torch's included. Schema 1::

    {"schema": 1,
     "device": {"name": "NVIDIA H200", "capability": [9, 0], "sm_count": 132},
     "versions": {"torch": "...", "triton": "...", "tritonbn": "..."},
     "date": "2025-01-01T00:00:00+00:00",
     "entries": [{"layout": "nchw", "dtype": "float32", "mode": "train",
                  "shape": [256, 6, 24, 24], "per_channel": 147456, "channels": 6,
                  "choice": "split-welford@tile=8192",
                  "timings_ms": {"torch": 0.031, "split-welford": 0.027, ...},
                  "torch_ms": 0.031, "ratio_to_torch": 0.87}, ...],
     ...}

Where tables come from, first match wins:

1. the user's tables (``*.json`` in ``$XDG_CACHE_HOME/tritonbn/tuning/``, else
   ``~/.cache/tritonbn/tuning/``; ``tritonbn-tune`` writes there), then the tables shipped in the
   package (``tritonbn/tuning_tables/``), for this GPU's exact device name;
2. the same two, for a GPU of the same compute capability;
3. otherwise the heuristics of ``tritonbn.kernels.plans``.

Within a table a call matches the nearest entry of the same layout, dtype and mode, nearest by
the distance of (log2 elements per channel, log2 C); an entry more than ``MAX_DISTANCE`` away
(a factor 4 along one axis) does not apply. ``TRITONBN_TUNING=off`` (read when the tables are
first loaded; :func:`reload` reads it again) disables every table. Nothing here times anything:
the same tables and the same input give the same plan.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from tritonbn.kernels.layout import describe_strides
from tritonbn.kernels.plans import parse_plan

__all__ = [
    "ENV",
    "MAX_DISTANCE",
    "SCHEMA",
    "Entry",
    "Table",
    "TableError",
    "choice",
    "load_table",
    "lookup",
    "packaged_dir",
    "reload",
    "tables",
    "user_dir",
]

SCHEMA = 1
ENV = "TRITONBN_TUNING"
# Farthest (log2 per-channel size, log2 C) distance at which an entry still applies.
MAX_DISTANCE = 2.0
MODES = ("train", "eval")


class TableError(ValueError):
    """A tuning table that cannot be read: not JSON, another schema, a malformed entry."""


@dataclass(frozen=True)
class Entry:
    """One measured case of a table: the candidate chosen and every candidate's time (ms)."""

    layout: str
    dtype: str
    training: bool
    shape: tuple[int, ...]
    per_channel: int
    channels: int
    choice: str
    timings_ms: Mapping[str, float]

    def ranked(self, *, plan: str | None = None, allow_torch: bool = True) -> list[str]:
        """The measured labels, fastest first (ties: label order), only kernel ``plan``'s when
        given, without torch unless ``allow_torch`` (and no ``plan``)."""
        labels = [
            label
            for label in sorted(self.timings_ms)
            if (label == "torch" and allow_torch and plan is None)
            or (label != "torch" and plan in (None, label.partition("@")[0]))
        ]
        return sorted(labels, key=self.timings_ms.__getitem__)

    def describe(self) -> str:
        mode = "train" if self.training else "eval"
        return f"{mode} {self.dtype} {self.layout} shape {tuple(self.shape)}"


@dataclass(frozen=True)
class Table:
    """A loaded tuning table: where it came from, the GPU it measured and its entries."""

    path: Path
    origin: str  # "user" or "packaged"
    device: str
    capability: tuple[int, int]
    entries: tuple[Entry, ...]


def user_dir() -> Path:
    """The user's tuning tables: ``$XDG_CACHE_HOME/tritonbn/tuning``, else
    ``~/.cache/tritonbn/tuning``. ``tritonbn-tune --out`` defaults to a file here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tritonbn" / "tuning"


def packaged_dir() -> Path:
    """The tables shipped with the package (one per GPU the project measured)."""
    return Path(__file__).resolve().parent / "tuning_tables"


def _entry(raw: Mapping[str, object]) -> Entry:
    mode = raw["mode"]
    if mode not in MODES:
        raise TableError(f"entry mode must be one of {MODES}, got {mode!r}")
    timings = {str(label): float(ms) for label, ms in dict(raw["timings_ms"]).items()}
    if not timings or any(not math.isfinite(ms) or ms <= 0 for ms in timings.values()):
        raise TableError("entry timings must be positive numbers")
    for label in timings:
        if label != "torch":
            parse_plan(label)  # raises ValueError on an unknown plan or tunable
    choice = str(raw["choice"])
    if choice not in timings:
        raise TableError(f"entry choice {choice!r} has no timing")
    per_channel, channels = int(raw["per_channel"]), int(raw["channels"])
    if per_channel < 1 or channels < 1:
        raise TableError("entry per_channel and channels must be positive")
    return Entry(
        layout=str(raw["layout"]),
        dtype=str(raw["dtype"]),
        training=mode == "train",
        shape=tuple(int(v) for v in raw["shape"]),
        per_channel=per_channel,
        channels=channels,
        choice=choice,
        timings_ms=MappingProxyType(timings),
    )


def load_table(path: Path, origin: str = "user") -> Table:
    """Read and validate the table at ``path``.

    Args:
        path: a JSON file written by ``tritonbn-tune``.
        origin: ``"user"`` or ``"packaged"`` (reported by ``explain``).

    Returns:
        The :class:`Table`.

    Raises:
        TableError: the file is not JSON, has another ``schema`` than :data:`SCHEMA`, or an
            entry is malformed (unknown plan or tunable, a choice without a timing, ...).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise TableError(f"{path}: not a readable JSON table ({error})") from error
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        found = raw.get("schema") if isinstance(raw, dict) else None
        raise TableError(f"{path}: schema {found!r}, this tritonbn reads schema {SCHEMA}")
    try:
        device = raw["device"]
        capability = tuple(int(v) for v in device["capability"])
        if len(capability) != 2:
            raise TableError("device capability must be [major, minor]")
        entries = tuple(_entry(item) for item in raw["entries"])
        return Table(
            path=path,
            origin=origin,
            device=str(device["name"]),
            capability=(capability[0], capability[1]),
            entries=entries,
        )
    except TableError as error:
        raise TableError(f"{path}: {error}") from error
    except (KeyError, TypeError, ValueError, OverflowError) as error:  # OverflowError: int(1e400)
        raise TableError(f"{path}: malformed table ({type(error).__name__}: {error})") from error


def _read_folder(folder: Path, origin: str) -> list[Table]:
    found = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        try:
            found.append(load_table(path, origin))
        except TableError as error:
            warnings.warn(f"tritonbn ignores a tuning table: {error}", RuntimeWarning, stacklevel=2)
    return found


@functools.cache
def tables() -> tuple[Table, ...]:
    """Every readable table, the user's first, then the packaged ones; () when
    ``TRITONBN_TUNING=off``. Read once a process (see :func:`reload`); unreadable files are
    skipped with a RuntimeWarning."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return ()
    try:
        user = _read_folder(user_dir(), "user")
    except RuntimeError as error:  # no XDG_CACHE_HOME, and Path.home() cannot find a home
        warnings.warn(f"tritonbn reads no user tuning tables: {error}", RuntimeWarning, stacklevel=2)
        user = []
    return (*user, *_read_folder(packaged_dir(), "packaged"))


def reload() -> None:
    """Forget the loaded tables, ``TRITONBN_TUNING`` and the dispatcher's cached decisions, so
    the next call reads them again (after ``tritonbn-tune`` wrote a table, or the variable
    changed)."""
    from . import dispatch

    tables.cache_clear()
    _identities.clear()
    dispatch.forget_decisions()


_identities: dict[torch.device, tuple[str, tuple[int, int]] | None] = {}


def device_identity(device: torch.device) -> tuple[str, tuple[int, int]] | None:
    """(device name, compute capability) of a CUDA ``device``; None for any other device."""
    if device.type != "cuda":
        return None
    if device not in _identities:
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        _identities[device] = (props.name, (props.major, props.minor))
    return _identities[device]


@dataclass(frozen=True)
class Match:
    """The entry a call uses: its table, how the table matched the GPU, and the distance."""

    table: Table
    entry: Entry
    kind: str  # "exact device" or "same compute capability"
    distance: float


def _distance(entry: Entry, per_channel: int, channels: int) -> float:
    return math.hypot(math.log2(per_channel / entry.per_channel), math.log2(channels / entry.channels))


def lookup(
    identity: tuple[str, tuple[int, int]],
    layout: str,
    dtype: str,
    training: bool,
    per_channel: int,
    channels: int,
    candidates: tuple[Table, ...] | None = None,
) -> Match | None:
    """The entry for a call, or None (heuristics).

    Args:
        identity: (device name, (major, minor)) of the GPU.
        layout: the input's layout name (``"nchw"``, ``"channels_last"``, ``"2d"``).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        training: training (forward+backward) or eval.
        per_channel: elements per channel (N·H·W).
        channels: C.
        candidates: the tables to search; :func:`tables` when None.

    Returns:
        The nearest entry (within :data:`MAX_DISTANCE`) of the first table, in precedence order
        (exact device name: user then packaged; then same compute capability: user then
        packaged), that has one; None when none does.
    """
    name, capability = identity
    pool = tables() if candidates is None else candidates
    ordered = [(t, "exact device") for t in pool if t.device == name]
    ordered += [
        (t, "same compute capability") for t in pool if t.device != name and t.capability == tuple(capability)
    ]
    for table, kind in ordered:
        best, best_distance = None, None
        for entry in table.entries:
            if (entry.layout, entry.dtype, entry.training) != (layout, dtype, training):
                continue
            distance = _distance(entry, per_channel, channels)
            if distance <= MAX_DISTANCE and (best_distance is None or distance < best_distance):
                best, best_distance = entry, distance
        if best is not None:
            return Match(table, best, kind, best_distance)
    return None


def _runs(label: str, layout: object, training: bool) -> bool:
    if label == "torch":
        return True
    plan, tunables = parse_plan(label)
    return (training or plan.name == "eval") and plan.refusal(layout, training, tunables) is None


@torch.compiler.assume_constant_result
def choice(
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    training: bool,
    forced: str | None,
    allow_torch: bool,
) -> tuple[str, str]:
    """(label, report) for a call on a dense tensor of ``shape`` and ``strides``: the label is
    ``""`` (use the heuristics), ``"torch"`` or a plan token that can run the input; the report
    is what ``explain()`` prints on its ``tuning`` line.

    The entry's choice, or when that cannot run here (another plan's tile limit) the fastest
    measured candidate that can. ``forced`` (a plan name) restricts the choice to that plan's
    candidates; ``allow_torch`` False (backend ``"triton"`` requested) to the kernels'. Under
    torch.compile the result is a constant of the traced graph, as every dispatcher decision is.
    """
    layout_facts = describe_strides(tuple(int(v) for v in shape), tuple(int(v) for v in strides))
    layout, per_channel, channels = layout_facts.name, layout_facts.rows, layout_facts.c
    if not tables():
        off = os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no")
        return "", "heuristics (TRITONBN_TUNING=off)" if off else "heuristics (no tuning table)"
    identity = device_identity(device)
    if identity is None:
        return "", f"heuristics (no tuning table applies to a {device.type} device)"
    dtype_name = str(dtype).replace("torch.", "")
    match = lookup(identity, layout, dtype_name, training, per_channel, channels)
    if match is None:
        return "", (
            f"heuristics (no table entry for {identity[0]} within distance {MAX_DISTANCE} "
            f"of {'train' if training else 'eval'} {dtype_name} {layout}, "
            f"{per_channel} per channel, C={channels})"
        )
    entry = match.entry
    ranked = [
        label
        for label in entry.ranked(plan=forced, allow_torch=allow_torch)
        if _runs(label, layout_facts, training)
    ]
    where = (
        f"table {match.table.path} ({match.table.origin}, {match.kind} {match.table.device}), "
        f"entry {entry.describe()} at distance {match.distance:.2f}"
    )
    if not ranked:
        wanted = f"of plan {forced!r}" if forced else "of the kernels" if not allow_torch else ""
        return "", f"heuristics ({where} has no measured candidate {wanted} that can run this input)"
    label = entry.choice if entry.choice in ranked else ranked[0]
    ms = entry.timings_ms[label]
    torch_ms = entry.timings_ms.get("torch")
    if label == "torch":
        kernels = [other for other in ranked if other != "torch"]
        if not kernels:
            return label, f"{where}: torch measured {ms:.4g} ms"
        fastest = kernels[0]
        kernel_ms = entry.timings_ms[fastest]
        return label, (
            f"{where}: torch measured {ms:.4g} ms, the fastest kernel {fastest} "
            f"{kernel_ms:.4g} ms ({kernel_ms / ms:.2f}x torch's)"
        )
    ratio = f", {ms / torch_ms:.2f}x torch's {torch_ms:.4g} ms" if torch_ms else ""
    return label, f"{where}: {label} measured {ms:.4g} ms{ratio}"
