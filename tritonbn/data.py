"""Fashion-MNIST for the trainer: find the four idx files, check them, load them as uint8 tensors.

The files are searched, in order, in ``--data-dir``, in ``$TRITONBN_DATA``, in tritonbn's cache
(``$XDG_CACHE_HOME/tritonbn`` or ``~/.cache/tritonbn``), in Debian's ``dataset-fashion-mnist``
folder (``/usr/share/datasets/fashion-mnist``, four ``.gz`` files), and last through torchvision's
download. ``.gz`` files and flat folders are first unpacked into the cache in torchvision's layout
(``<root>/FashionMNIST/raw``); torchvision's ``read_image_file``/``read_label_file`` read them.

Every file is checked before it is read, and a missing, truncated or corrupt file raises
:class:`FashionMNISTError` naming it: the idx header, length and label range of any file, and, for a
file of a full split (60,000 or 10,000 items), the MD5 of its uncompressed content, so a flipped
pixel is caught too. The MD5s are of the uncompressed files because Debian's ``.gz`` files differ
byte for byte from the ones torchvision downloads while holding the same content; torchvision lists
MD5s of its ``.gz`` files only. Smaller files (subsets, synthetic test data) have no reference sum
and are checked by structure alone; ``FashionMNISTTensors.verified`` says which check ran.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEBIAN_DIR",
    "FILE_NAMES",
    "RAW_MD5",
    "FashionMNISTError",
    "FashionMNISTTensors",
    "atomic_target",
    "cache_root",
    "check_idx_file",
    "load_fashion_mnist",
    "locate_fashion_mnist",
]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_MAGIC = 0x00000803  # idx: unsigned bytes (0x08), 3 dimensions
LABEL_MAGIC = 0x00000801  # idx: unsigned bytes (0x08), 1 dimension
IMAGE_SIDE = 28
NUM_CLASSES = 10
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(name for pair in SPLITS.values() for name in pair)
SPLIT_SIZES = {"train": 60000, "t10k": 10000}
# MD5 of each uncompressed file of the full data set, from Debian's dataset-fashion-mnist
# 0.0~git20200523.55506a9-1 (`zcat FILE.gz | md5sum`).
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
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
    """The whole data set as tensors: images uint8 (N, 28, 28), labels int64 (N,).

    ``verified`` is ``"md5"`` when every file matched :data:`RAW_MD5`, else ``"structure"``
    (header, length and labels checked; the files are not the full data set).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path
    origin: str
    verified: str = "structure"

    def to(self, device: torch.device | str) -> FashionMNISTTensors:
        """The same data on ``device`` (images stay uint8)."""
        return FashionMNISTTensors(
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.root,
            self.origin,
            self.verified,
        )


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an exception, removed in any case. A reader (or a Ctrl-C) sees the old file or the new
    one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_root() -> Path:
    """tritonbn's cache folder: ``$XDG_CACHE_HOME/tritonbn``, else ``~/.cache/tritonbn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonbn"


def _is_full_split(name: str, count: int) -> bool:
    return SPLIT_SIZES[name.split("-", 1)[0]] == count


def check_idx_file(path: Path, shown_as: Path | None = None, *, name: str | None = None) -> int:
    """Check that ``path`` is a complete Fashion-MNIST idx file of the kind ``name`` (default:
    ``path``'s name) says (images: magic 0x803, 28x28; labels: magic 0x801, values 0-9), and, when
    it holds a full split, that its MD5 is :data:`RAW_MD5`'s; return its item count.

    Raises :class:`FashionMNISTError` naming ``shown_as`` (default ``path``) otherwise.
    """
    shown = shown_as or path
    name = name or path.name
    is_images = "images" in name
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
    if _is_full_split(name, count):
        from torchvision.datasets.utils import calculate_md5

        got = calculate_md5(path)
        if got != RAW_MD5[name]:
            raise FashionMNISTError(
                f"{shown}: corrupt: the MD5 of its {count} items (uncompressed) is {got}, "
                f"Fashion-MNIST's {name} has {RAW_MD5[name]}"
            )
    elif not is_images:
        labels = torch.frombuffer(bytearray(path.read_bytes()[header_size:]), dtype=torch.uint8)
        if int(labels.max()) >= NUM_CLASSES:
            index = int(torch.nonzero(labels >= NUM_CLASSES)[0])
            raise FashionMNISTError(
                f"{shown}: label {int(labels[index])} at item {index}, Fashion-MNIST's classes are 0-9"
            )
    return count


def check_raw_folder(raw: Path, shown_dir: Path | None = None, *, contents: bool = True) -> str:
    """Check the four uncompressed files in ``raw`` (each with :func:`check_idx_file`, unless
    ``contents`` is False because that was just done) and that images and labels pair up; return
    ``"md5"`` when all four are the full data set's, else ``"structure"``."""
    shown = shown_dir or raw

    def count(name: str) -> int:
        if contents:
            return check_idx_file(raw / name, shown / name)
        with open(raw / name, "rb") as handle:
            return struct.unpack(">II", handle.read(8))[1]

    full = True
    for split, (images_name, labels_name) in SPLITS.items():
        n_images, n_labels = count(images_name), count(labels_name)
        if n_images != n_labels:
            raise FashionMNISTError(
                f"{shown}: {split} set has {n_images} images in {images_name} but {n_labels} labels "
                f"in {labels_name}"
            )
        full = full and _is_full_split(images_name, n_images)
    return "md5" if full else "structure"


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
    """Copy or decompress ``source`` to ``target`` atomically, checking the result first. A read
    error is the source's (a FashionMNISTError naming it); a write error (disk full, no
    permission) is left to the caller, the cache's."""
    compressed = source.suffix == ".gz"
    opener = gzip.open if compressed else open

    def source_error(exc: BaseException) -> FashionMNISTError:
        damaged = compressed and isinstance(exc, gzip.BadGzipFile | EOFError | zlib.error)
        what = "corrupt or truncated gzip file" if damaged else "cannot be read"
        return FashionMNISTError(f"{source}: {what} ({exc})")

    with atomic_target(target) as tmp:
        with contextlib.ExitStack() as files:
            try:
                src = files.enter_context(opener(source, "rb"))
            except OSError as exc:
                raise source_error(exc) from None
            dst = files.enter_context(open(tmp, "wb"))
            while True:
                try:
                    chunk = src.read(1 << 20)
                except (OSError, EOFError, zlib.error) as exc:
                    raise source_error(exc) from None
                if not chunk:
                    break
                dst.write(chunk)
        check_idx_file(tmp, shown_as=source, name=target.name)


def _prepare_root(files: dict[str, Path], root: Path, shown_dir: Path) -> str:
    """Fill ``root/FashionMNIST/raw`` from ``files`` (name -> source path), each file checked;
    returns :func:`check_raw_folder`'s verdict."""
    raw = root / "FashionMNIST" / "raw"
    with _writing_cache(root):
        raw.mkdir(parents=True, exist_ok=True)
        for name in FILE_NAMES:
            _unpack(files[name], raw / name)
    return check_raw_folder(raw, shown_dir, contents=False)


@contextlib.contextmanager
def _writing_cache(root: Path) -> Iterator[None]:
    """Turn an OSError while writing the cache (no home folder, no permission, disk full) into a
    FashionMNISTError that names the cache and the way around it."""
    try:
        yield
    except OSError as exc:
        raise FashionMNISTError(
            f"cannot write tritonbn's data cache {root} ({exc.strerror or exc}); set XDG_CACHE_HOME "
            "to a writable folder, or point --data-dir or $TRITONBN_DATA at a folder in "
            "torchvision's layout (FashionMNIST/raw/, unpacked), which is used in place"
        ) from None


def _stamp(files: dict[str, Path]) -> dict[str, list[object]]:
    return {name: [str(path), path.stat().st_size, path.stat().st_mtime_ns] for name, path in files.items()}


def _missing_message(folder: Path, found: dict[str, Path], source: str) -> str:
    missing = ", ".join(f"{name}[.gz]" for name in FILE_NAMES if name not in found)
    return f"{source} {folder}: missing {missing}; {HOW_TO_GET}"


def _from_folder(folder: Path, source: str) -> tuple[Path, str]:
    """The torchvision root for an explicitly named folder (``--data-dir``, ``$TRITONBN_DATA``).

    torchvision's layout (``folder/FashionMNIST/raw``, uncompressed) is used in place; four files
    (plain or .gz) directly in ``folder`` are unpacked once into a cache folder keyed by the
    folder's path and refreshed when a file's size or time changes.
    """
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise FashionMNISTError(f"{source} {folder}: {what}; {HOW_TO_GET}")
    raw = folder / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FILE_NAMES):
        return folder, check_raw_folder(raw)
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
        verified = _checked_cache(root)
        if verified is not None:
            return root, verified
    verified = _prepare_root(found, root, folder)
    with _writing_cache(root), atomic_target(stamp_path) as tmp:
        tmp.write_text(json.dumps(stamp, indent=1))
    return root, verified


def _checked_cache(root: Path) -> str | None:
    """:func:`check_raw_folder`'s verdict on a cache folder; None if it is incomplete or damaged
    (then rebuilt from the source files or downloaded again)."""
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in FILE_NAMES):
        return None
    try:
        return check_raw_folder(raw)
    except FashionMNISTError:
        return None


def _download(root: Path) -> str:
    """torchvision's download into ``root``; any failure becomes a FashionMNISTError. No timeout
    of ours: torchvision's downloader takes none, and the process-wide socket default is not this
    function's to change."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError on network trouble
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FashionMNISTError(
            f"Fashion-MNIST not found locally and the download failed ({first_line}); {HOW_TO_GET}"
        ) from None
    return check_raw_folder(root / "FashionMNIST" / "raw")


def _locate(
    data_dir: str | os.PathLike[str] | None, download: bool, debian_dir: Path
) -> tuple[Path, str, str]:
    """(torchvision root, origin, verdict of :func:`check_raw_folder`), searched in order."""
    env = os.environ.get("TRITONBN_DATA")
    for folder, origin in ((data_dir, "--data-dir"), (env or None, "$TRITONBN_DATA")):
        if folder is not None:
            root, verified = _from_folder(Path(folder).expanduser(), origin)
            return root, origin, verified
    root = cache_root()
    verified = _checked_cache(root)
    if verified is not None:
        return root, "cache", verified
    found = _source_files(debian_dir) if debian_dir.is_dir() else {}
    if found:
        if len(found) < len(FILE_NAMES):
            raise FashionMNISTError(_missing_message(debian_dir, found, "Debian's folder"))
        return root, "debian", _prepare_root(found, root, debian_dir)
    if download:
        return root, "download", _download(root)
    raise FashionMNISTError(f"Fashion-MNIST not found; {HOW_TO_GET}")


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
    root, origin, _ = _locate(data_dir, download, debian_dir)
    return root, origin


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    download: bool = True,
    debian_dir: Path = DEBIAN_DIR,
) -> FashionMNISTTensors:
    """Fashion-MNIST, checked and read by torchvision's idx readers, as tensors on ``device``.

    ``limit`` keeps the first ``limit`` images of each split. See :func:`locate_fashion_mnist`
    for where the files are looked for and what is raised when they are absent or damaged.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file

    root, origin, verified = _locate(data_dir, download, debian_dir)
    raw = root / "FashionMNIST" / "raw"
    keep = slice(None) if limit is None else slice(0, limit)

    def read(name: str) -> torch.Tensor:
        reader = read_image_file if "images" in name else read_label_file
        return reader(str(raw / name))[keep].contiguous()

    return FashionMNISTTensors(*map(read, FILE_NAMES), root, origin, verified).to(device)
