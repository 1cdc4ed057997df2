"""Finding, checking and loading Fashion-MNIST: the search order, the cache, and clear errors for
missing, truncated or corrupt files. Synthetic idx files keep these tests independent of the real
data; one test reads Debian's files when they are installed."""

import gzip
import os
import shutil
import socket
import struct
from pathlib import Path

import pytest
import torch

from tritonbn.data import (
    DEBIAN_DIR,
    FILE_NAMES,
    RAW_MD5,
    FashionMNISTError,
    cache_root,
    check_idx_file,
    load_fashion_mnist,
    locate_fashion_mnist,
)

from .idx_files import write_idx

SIZES = {"train": 40, "t10k": 16}


def write_fake_set(folder: Path, compressed: bool = True, train_size: int = SIZES["train"]) -> Path:
    """Four small random idx files in ``folder`` (gzip-compressed unless told otherwise)."""
    generator = torch.Generator().manual_seed(train_size)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compressed else ""
    for split, size in (("train", train_size), ("t10k", SIZES["t10k"])):
        images = torch.randint(0, 256, (size, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, 10, (size,), generator=generator, dtype=torch.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own empty cache and no $TRITONBN_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITONBN_DATA", raising=False)


def test_write_idx_round_trips_through_torchvision(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    data = load_fashion_mnist(folder, download=False)
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as handle:
        raw = handle.read()
    expected = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(-1, 28, 28)
    assert torch.equal(data.train_images, expected)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_images.shape == (SIZES["train"], 28, 28)
    assert data.test_labels.shape == (SIZES["t10k"],)
    assert data.verified == "structure", "synthetic files have no reference MD5"


def test_check_idx_file_counts_items(tmp_path):
    write_fake_set(tmp_path, compressed=False)
    assert check_idx_file(tmp_path / "train-images-idx3-ubyte") == SIZES["train"]
    assert check_idx_file(tmp_path / "t10k-labels-idx1-ubyte") == SIZES["t10k"]


def test_flat_gz_folder_is_unpacked_into_the_cache(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    root, origin = locate_fashion_mnist(folder, download=False)
    assert origin == "--data-dir"
    assert root.is_relative_to(cache_root())
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(FILE_NAMES)
    assert not list((root / "FashionMNIST" / "raw").glob(".*tmp")), "temporary files left behind"


def test_a_cache_that_cannot_be_written_is_named_with_the_way_around_it(tmp_path, monkeypatch):
    folder = write_fake_set(tmp_path / "src")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file" / "cache"))  # even root cannot
    with pytest.raises(FashionMNISTError, match=r"cannot write tritonbn's data cache .*a-file.*XDG_CACHE"):
        locate_fashion_mnist(folder, download=False)


def test_cached_copy_is_refreshed_when_the_source_changes(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    assert load_fashion_mnist(folder, download=False).train_images.shape[0] == SIZES["train"]
    write_fake_set(folder, train_size=24)
    # a different size also changes the stamp (size and mtime) of the source files
    assert load_fashion_mnist(folder, download=False).train_images.shape[0] == 24


def test_torchvision_layout_is_used_in_place(tmp_path):
    write_fake_set(tmp_path / "tv" / "FashionMNIST" / "raw", compressed=False)
    root, _ = locate_fashion_mnist(tmp_path / "tv", download=False)
    assert root == tmp_path / "tv"


def test_search_order(tmp_path, monkeypatch):
    explicit = write_fake_set(tmp_path / "explicit", train_size=10)
    from_env = write_fake_set(tmp_path / "env", train_size=12)
    debian = write_fake_set(tmp_path / "debian", train_size=14)
    monkeypatch.setenv("TRITONBN_DATA", str(from_env))

    def count(data_dir=None):
        data = load_fashion_mnist(data_dir, download=False, debian_dir=debian)
        return data.origin, data.train_images.shape[0]

    assert count(explicit) == ("--data-dir", 10)
    assert count() == ("$TRITONBN_DATA", 12)
    monkeypatch.delenv("TRITONBN_DATA")
    assert count() == ("debian", 14)
    assert count() == ("cache", 14)
    for name in FILE_NAMES:
        (debian / f"{name}.gz").unlink()
    assert count() == ("cache", 14), "the cache must serve once the Debian files are gone"


def test_damaged_cache_is_rebuilt_from_debian(tmp_path):
    debian = write_fake_set(tmp_path / "debian")
    root, _ = locate_fashion_mnist(download=False, debian_dir=debian)
    target = root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:100])
    assert locate_fashion_mnist(download=False, debian_dir=debian)[1] == "debian"
    assert check_idx_file(target) == SIZES["t10k"]


def test_nothing_found_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FashionMNISTError, match="apt-get install dataset-fashion-mnist") as info:
        locate_fashion_mnist(download=False, debian_dir=tmp_path / "absent")
    assert "--data-dir" in str(info.value)


def test_missing_file_is_named(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FashionMNISTError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        locate_fashion_mnist(folder, download=False)


def test_missing_folder(tmp_path):
    with pytest.raises(FashionMNISTError, match="no such folder"):
        locate_fashion_mnist(tmp_path / "nowhere", download=False)


def test_full_split_with_a_wrong_md5_is_corrupt(tmp_path):
    """A file with a full split's item count must have Fashion-MNIST's MD5: right header and
    length, wrong pixels (or labels) still fail, naming the file."""
    folder = write_fake_set(tmp_path / "src", compressed=False)
    labels = torch.randint(0, 10, (10000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(
        FashionMNISTError,
        match=r"t10k-labels-idx1-ubyte: corrupt: the MD5 of its 10000 "
        r"items \(uncompressed\) is [0-9a-f]{32}, Fashion-MNIST's t10k-labels-idx1-ubyte has "
        + RAW_MD5["t10k-labels-idx1-ubyte"],
    ) as info:
        locate_fashion_mnist(folder, download=False)
    assert str(folder) in str(info.value)


def test_download_failure_is_explained_and_leaves_socket_defaults(tmp_path, monkeypatch):
    import torchvision.datasets

    seen = []

    def failing_download(root, train, download):
        seen.append(socket.getdefaulttimeout())
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", failing_download)
    before = socket.getdefaulttimeout()
    with pytest.raises(FashionMNISTError, match=r"download failed \(network is unreachable\)"):
        locate_fashion_mnist(debian_dir=tmp_path / "absent")
    assert seen == [before] and socket.getdefaulttimeout() == before


def test_truncated_image_file(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(FashionMNISTError, match="train-images-idx3-ubyte: truncated") as info:
        locate_fashion_mnist(folder, download=False)
    assert str(folder) in str(info.value), "the message must name the user's file, not the cache copy"


def test_file_shorter_than_its_header(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(FashionMNISTError, match="shorter than the 8-byte idx header"):
        locate_fashion_mnist(folder, download=False)


def test_truncated_gzip_stream(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(FashionMNISTError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        locate_fashion_mnist(folder, download=False)


def test_not_a_gzip_file(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is no gzip data" * 10)
    with pytest.raises(FashionMNISTError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        locate_fashion_mnist(folder, download=False)


def test_wrong_magic_number(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    # a label file where an image file should be: right length for nothing, wrong magic
    (folder / "train-images-idx3-ubyte").write_bytes((folder / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(FashionMNISTError, match="train-images-idx3-ubyte: wrong magic number 0x00000801"):
        locate_fashion_mnist(folder, download=False)


def test_wrong_image_size(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    write_idx(folder / "t10k-images-idx3-ubyte", torch.zeros(SIZES["t10k"], 32, 32, dtype=torch.uint8))
    with pytest.raises(FashionMNISTError, match="images are 32x32"):
        locate_fashion_mnist(folder, download=False)


def test_trailing_bytes(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    with open(folder / "t10k-labels-idx1-ubyte", "ab") as handle:
        handle.write(b"\x01\x02")
    with pytest.raises(FashionMNISTError, match="2 unexpected bytes"):
        locate_fashion_mnist(folder, download=False)


def test_label_out_of_range(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    labels = torch.zeros(SIZES["t10k"], dtype=torch.uint8)
    labels[3] = 11
    write_idx(folder / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(FashionMNISTError, match="label 11 at item 3"):
        locate_fashion_mnist(folder, download=False)


def test_images_and_labels_must_pair_up(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    write_idx(folder / "train-labels-idx1-ubyte", torch.zeros(SIZES["train"] - 1, dtype=torch.uint8))
    with pytest.raises(FashionMNISTError, match=f"{SIZES['train']} images .* {SIZES['train'] - 1} labels"):
        locate_fashion_mnist(folder, download=False)


def test_header_announcing_nothing(tmp_path):
    folder = write_fake_set(tmp_path / "src", compressed=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 0))
    with pytest.raises(FashionMNISTError, match="announces 0 items"):
        locate_fashion_mnist(folder, download=False)


def test_limit_and_device(tmp_path):
    folder = write_fake_set(tmp_path / "src")
    data = load_fashion_mnist(folder, download=False, limit=8, device="cpu")
    full = load_fashion_mnist(folder, download=False)
    assert data.train_images.shape == (8, 28, 28) and data.test_labels.shape == (8,)
    assert torch.equal(data.train_images, full.train_images[:8])
    assert torch.equal(data.test_labels, full.test_labels[:8])


@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_DIR} is absent)",
)
def test_real_debian_data():
    data = load_fashion_mnist(download=False)
    assert data.origin == "debian" and data.verified == "md5"
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [1000] * 10
    assert 0 < data.train_images.float().mean() < 255


@pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_DIR} is absent)",
)
def test_one_flipped_pixel_of_the_real_data_is_caught(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for name in FILE_NAMES:
        shutil.copyfile(DEBIAN_DIR / f"{name}.gz", folder / f"{name}.gz")
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as handle:
        raw = bytearray(handle.read())
    raw[16 + 5000 * 28 * 28 + 400] ^= 0x01
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    (folder / "t10k-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(FashionMNISTError, match=r"t10k-images-idx3-ubyte: corrupt: the MD5"):
        load_fashion_mnist(folder, download=False)
