"""Fashion-MNIST for the trainer: find the four idx files, check them, load them as uint8 tensors.

The files are searched, in order, in ``--data-dir``, in ``$TRITONBN_DATA``, in tritonbn's cache
(``$XDG_CACHE_HOME/tritonbn`` or ``~/.cache/tritonbn``), in Debian's ``dataset-fashion-mnist``
folder (``/usr/share/datasets/fashion-mnist``, four ``.gz`` files), and last through torchvision's
download. torchvision's ``FashionMNIST`` class reads them; it wants the uncompressed files under
``<root>/FashionMNIST/raw``, so ``.gz`` files and flat folders are first unpacked into the cache.
Every file is checked here (magic number, image size, length, label range) before torchvision
opens it: a missing, truncated or corrupt file raises :class:`FashionMNISTError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEBIAN_DIR",
    "FILE_NAMES",
    "FashionMNISTError",
    "FashionMNISTTensors",
    "cache_root",
    "check_idx_file",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "write_idx",
]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_MAGIC = 0x00000803  # idx: unsigned bytes (0x08), 3 dimensions
LABEL_MAGIC = 0x00000801  # idx: unsigned bytes (0x08), 1 dimension
IMAGE_SIDE = 28
NUM_CLASSES = 10
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILE_NAMES = tuple(name for pair in SPLITS.values() for name in pair)
HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, which puts the four .gz files "
    f"in {DEBIAN_DIR}), or pass --data-dir (or set $TRITONBN_DATA) to a folder holding "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (plain or .gz, or torchvision's <root>/FashionMNIST/raw layout)"
)


class FashionMNISTError(RuntimeError):
    """The Fashion-MNIST files are missing, truncated or not what they claim to be."""


@dataclass(frozen=True)
class FashionMNISTTensors:
    """The whole data set as tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path
    origin: str

    def to(self, device: torch.device | str) -> FashionMNISTTensors:
        """The same data on ``device`` (images stay uint8)."""
        return FashionMNISTTensors(
            self.train_images.to(device), self.train_labels.to(device),
            self.test_images.to(device), self.test_labels.to(device), self.root, self.origin,
        )


def cache_root() -> Path:
    """tritonbn's cache folder: ``$XDG_CACHE_HOME/tritonbn``, else ``~/.cache/tritonbn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonbn"


def check_idx_file(path: Path, shown_as: Path | None = None) -> int:
    """Check that ``path`` is a complete Fashion-MNIST idx file of the kind its name says
    (images: magic 0x803, 28x28; labels: magic 0x801, values 0-9) and return its item count.

    Raises :class:`FashionMNISTError` naming ``shown_as`` (default ``path``) otherwise.
    """
    shown = shown_as or path
    is_images = "images" in path.name
    header_size = 16 if is_images else 8
    magic_wanted = IMAGE_MAGIC if is_images else LABEL_MAGIC
    if not path.is_file():
        raise FashionMNISTError(f"{shown}: file missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(header_size)
        if len(header) < header_size:
            raise FashionMNISTError(
                f"{shown}: truncated: {size} bytes, shorter than the {header_size}-byte idx header"
            )
        magic, count = struct.unpack(">II", header[:8])
        if magic != magic_wanted:
            kind = "image (idx3)" if is_images else "label (idx1)"
            raise FashionMNISTError(
                f"{shown}: wrong magic number 0x{magic:08x}, expected 0x{magic_wanted:08x} for a "
                f"Fashion-MNIST {kind} file (not an idx file, or still compressed?)"
            )
        item_size = 1
        if is_images:
            rows, cols = struct.unpack(">II", header[8:16])
            if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
                raise FashionMNISTError(
                    f"{shown}: images are {rows}x{cols}, Fashion-MNIST's are {IMAGE_SIDE}x{IMAGE_SIDE}"
                )
            item_size = rows * cols
        if count == 0:
            raise FashionMNISTError(f"{shown}: the header announces 0 items")
        expected = header_size + count * item_size
        if size < expected:
            raise FashionMNISTError(
                f"{shown}: truncated: {size} bytes, the header announces {count} items ({expected} bytes)"
            )
        if size > expected:
            raise FashionMNISTError(
                f"{shown}: {size - expected} unexpected bytes after the {count} items the header announces"
            )
        if not is_images:
            labels = torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
            if int(labels.max()) >= NUM_CLASSES:
                index = int(torch.nonzero(labels >= NUM_CLASSES)[0])
                raise FashionMNISTError(
                    f"{shown}: label {int(labels[index])} at item {index}, Fashion-MNIST's classes are 0-9"
                )
    return count


def check_raw_folder(raw: Path, shown_dir: Path | None = None) -> None:
    """Check the four uncompressed files in ``raw`` and that images and labels pair up."""
    shown = shown_dir or raw
    for split, (images_name, labels_name) in SPLITS.items():
        n_images = check_idx_file(raw / images_name, shown / images_name)
        n_labels = check_idx_file(raw / labels_name, shown / labels_name)
        if n_images != n_labels:
            raise FashionMNISTError(
                f"{shown}: {split} set has {n_images} images in {images_name} but {n_labels} labels "
                f"in {labels_name}"
            )


def _source_files(folder: Path) -> dict[str, Path]:
    """The four files found in ``folder``, each as itself or as ``.gz`` (plain preferred)."""
    found = {}
    for name in FILE_NAMES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def _unpack(source: Path, target: Path) -> None:
    """Copy or decompress ``source`` to ``target`` atomically, checking the result first."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if source.suffix == ".gz":
            try:
                with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (OSError, EOFError, zlib.error) as exc:
                raise FashionMNISTError(f"{source}: corrupt or truncated gzip file ({exc})") from None
        else:
            shutil.copyfile(source, tmp)
        check_idx_file(tmp, shown_as=source)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_root(files: dict[str, Path], root: Path) -> None:
    """Fill ``root/FashionMNIST/raw`` from ``files`` (name -> source path)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILE_NAMES:
        _unpack(files[name], raw / name)


def _stamp(files: dict[str, Path]) -> dict[str, list[object]]:
    return {name: [str(path), path.stat().st_size, path.stat().st_mtime_ns] for name, path in files.items()}


def _missing_message(folder: Path, found: dict[str, Path], source: str) -> str:
    missing = ", ".join(f"{name}[.gz]" for name in FILE_NAMES if name not in found)
    return f"{source} {folder}: missing {missing}; {HOW_TO_GET}"


def _from_folder(folder: Path, source: str) -> Path:
    """The torchvision root for an explicitly named folder (``--data-dir``, ``$TRITONBN_DATA``).

    torchvision's layout (``folder/FashionMNIST/raw``, uncompressed) is used in place; four files
    (plain or .gz) directly in ``folder`` are unpacked once into a cache folder keyed by the
    folder's path and refreshed when a file's size or time changes.
    """
    if not folder.is_dir():
        raise FashionMNISTError(f"{source} {folder}: no such folder; {HOW_TO_GET}")
    raw = folder / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FILE_NAMES):
        check_raw_folder(raw)
        return folder
    found = _source_files(folder)
    if len(found) < len(FILE_NAMES):
        in_raw = _source_files(raw)
        if len(in_raw) == len(FILE_NAMES):
            found = in_raw
        else:
            raise FashionMNISTError(_missing_message(folder, found, source))
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    root = cache_root() / "folders" / key
    stamp_path = root / "source.json"
    stamp = _stamp(found)
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        try:
            check_raw_folder(root / "FashionMNIST" / "raw")
            return root
        except FashionMNISTError:
            pass  # a damaged cache copy is rebuilt below from the source files
    _prepare_root(found, root)
    check_raw_folder(root / "FashionMNIST" / "raw", shown_dir=folder)
    _write_atomic(stamp_path, json.dumps(stamp, indent=1))
    return root


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cache_is_complete(root: Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in FILE_NAMES):
        return False
    try:
        check_raw_folder(raw)
    except FashionMNISTError:
        return False  # damaged: rebuilt from Debian's files or downloaded again
    return True


def _download(root: Path) -> None:
    """torchvision's download into ``root``; any failure becomes a FashionMNISTError."""
    from torchvision.datasets import FashionMNIST

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError on network trouble
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FashionMNISTError(
            f"Fashion-MNIST not found locally and the download failed ({first_line}); {HOW_TO_GET}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    check_raw_folder(root / "FashionMNIST" / "raw")


def locate_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    debian_dir: Path = DEBIAN_DIR,
) -> tuple[Path, str]:
    """(torchvision root, origin) of checked Fashion-MNIST files, searched in the module's order.

    ``origin`` names where they came from: ``--data-dir``, ``$TRITONBN_DATA``, ``cache``,
    ``debian`` (unpacked into the cache) or ``download``. Raises :class:`FashionMNISTError` with
    instructions when no source has them, or naming the file when one is damaged.
    """
    if data_dir is not None:
        return _from_folder(Path(data_dir).expanduser(), "--data-dir"), "--data-dir"
    env = os.environ.get("TRITONBN_DATA")
    if env:
        return _from_folder(Path(env).expanduser(), "$TRITONBN_DATA"), "$TRITONBN_DATA"
    root = cache_root()
    if _cache_is_complete(root):
        return root, "cache"
    found = _source_files(debian_dir) if debian_dir.is_dir() else {}
    if found:
        if len(found) < len(FILE_NAMES):
            raise FashionMNISTError(_missing_message(debian_dir, found, "Debian's folder"))
        _prepare_root(found, root)
        check_raw_folder(root / "FashionMNIST" / "raw", shown_dir=debian_dir)
        return root, "debian"
    if download:
        _download(root)
        return root, "download"
    raise FashionMNISTError(f"Fashion-MNIST not found; {HOW_TO_GET}")


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    download: bool = True,
    debian_dir: Path = DEBIAN_DIR,
) -> FashionMNISTTensors:
    """Fashion-MNIST through torchvision's ``FashionMNIST`` class, as tensors on ``device``.

    ``limit`` keeps the first ``limit`` images of each split. See :func:`locate_fashion_mnist`
    for where the files are looked for and what is raised when they are absent or damaged.
    """
    from torchvision.datasets import FashionMNIST

    root, origin = locate_fashion_mnist(data_dir, download=download, debian_dir=debian_dir)
    train = FashionMNIST(str(root), train=True, download=False)
    test = FashionMNIST(str(root), train=False, download=False)
    keep = slice(None) if limit is None else slice(0, limit)
    return FashionMNISTTensors(
        train.data[keep].contiguous(), train.targets[keep].contiguous(),
        test.data[keep].contiguous(), test.targets[keep].contiguous(), root, origin,
    ).to(device)


def write_idx(path: str | os.PathLike[str], tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an idx file: (N, H, W) as images, (N,) as labels; gzip-compressed
    when ``path`` ends in ``.gz``. Used to save subsets and to build test data."""
    if tensor.dtype != torch.uint8 or tensor.dim() not in (1, 3):
        raise ValueError(f"write_idx wants a uint8 tensor of 1 or 3 dimensions, got {tensor.dtype} "
                         f"{tuple(tensor.shape)}")
    magic = LABEL_MAGIC if tensor.dim() == 1 else IMAGE_MAGIC
    header = struct.pack(f">{1 + tensor.dim()}I", magic, *tensor.shape)
    payload = header + tensor.contiguous().cpu().numpy().tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
