"""Readers of the small datasets that fit in memory: CIFAR-10/100 pickles and Fashion-MNIST idx files.

Each split is decoded once into a uint8 tensor (N, C, H, W), so that per-sample work is a tensor
transform rather than a PIL decode: the whole of Fashion-MNIST loads in a fraction of a second.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cmtkd_graph.errors import UserError
from cmtkd_graph.safe_files import read_cifar_pickle

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

Split = tuple[torch.Tensor, torch.Tensor]
"""uint8 images (N, C, H, W) and int64 labels (N,)."""


@dataclass(frozen=True)
class Splits:
    train: Split
    eval: Split
    classes: list[str]


class TensorImages(Dataset):
    """In-memory uint8 images with integer labels; ``transform`` runs on one (C, H, W) tensor at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# --- CIFAR ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}
_CIFAR_PIXELS = 3 * 32 * 32


def read_cifar(name: str, root: str, *, download: bool) -> Splits:
    """CIFAR-10 or CIFAR-100 in torchvision's format: ``root/cifar-10-batches-py/`` (or the folder itself)."""
    layout = _CIFAR[name]
    folder = _cifar_folder(layout, Path(root))
    needed = (*layout.train_files, *layout.eval_files, layout.meta_file)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and download:
        _download_cifar(name, root)
        folder, missing = Path(root) / layout.folder, []
    if missing:
        raise UserError(
            f"{layout.title} not found: {folder} lacks {', '.join(missing)}. Set `data.download: true` "
            f"(needs internet), or extract {layout.archive} (https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"into {root} so that {Path(root) / layout.folder} holds the python batches"
        )
    classes = [str(c) for c in _unpickle(folder / layout.meta_file, layout.names_key)[layout.names_key]]
    train = _cifar_split(folder, layout.train_files, layout.label_key, len(classes))
    evaluation = _cifar_split(folder, layout.eval_files, layout.label_key, len(classes))
    return Splits(train, evaluation, classes)


def _cifar_folder(layout: _CifarLayout, root: Path) -> Path:
    # Accept `root` pointing at the batches folder itself: an easy mistake with an obvious meaning.
    if not (root / layout.folder).is_dir() and (root / layout.meta_file).is_file():
        return root
    return root / layout.folder


def _download_cifar(name: str, root: str) -> None:
    from torchvision import datasets

    builder = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        builder(root, train=True, download=True)
    except Exception as e:  # network, disk or checksum failure: all mean the same to the user
        raise UserError(
            f"could not download {_CIFAR[name].title} into {root} ({type(e).__name__}: {e}); "
            f"check the internet connection, or put the extracted {_CIFAR[name].archive} there by hand"
        ) from e


def _unpickle(path: Path, *required: str) -> dict:
    entry = read_cifar_pickle(path)
    absent = [k for k in required if not isinstance(entry, dict) or k not in entry]
    if absent:
        raise UserError(
            f"{path}: a CIFAR python batch must be a dict with keys {', '.join(required)}; "
            f"missing {', '.join(absent)}. Is it the right dataset?"
        )
    return entry


def _cifar_split(folder: Path, files: tuple[str, ...], label_key: str, num_classes: int) -> Split:
    images, labels = [], []
    for name in files:
        path = folder / name
        entry = _unpickle(path, "data", label_key)
        data = np.asarray(entry["data"])
        batch_labels = np.asarray(entry[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
            raise UserError(
                f"{path}: 'data' must be uint8 of shape (N, {_CIFAR_PIXELS}), "
                f"got {data.dtype} {data.shape}; re-extract the archive"
            )
        in_range = len(data) == 0 or 0 <= batch_labels.min() <= batch_labels.max() < num_classes
        if batch_labels.shape != (len(data),) or not in_range:
            raise UserError(
                f"{path}: expected {len(data)} labels in 0..{num_classes - 1} under "
                f"{label_key!r}, got shape {batch_labels.shape}; re-extract the archive"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(batch_labels))
    return torch.cat(images), torch.cat(labels)


# --- Fashion-MNIST --------------------------------------------------------------------------------

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "eval": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


def read_fashion_mnist(root: str | None) -> Splits:
    """The four original gzipped idx files of Fashion-MNIST (default: Debian's dataset-fashion-mnist)."""
    folder = Path(root or FASHION_MNIST_ROOT)
    names = [n for pair in _FASHION_FILES.values() for n in pair]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        hint = (
            "install them with `apt-get install dataset-fashion-mnist` (as root)"
            if root is None
            else f"put them there, or drop `data.root` to use {FASHION_MNIST_ROOT} "
            "(`apt-get install dataset-fashion-mnist` as root)"
        )
        raise UserError(f"Fashion-MNIST not found: {folder} lacks {', '.join(missing)}; {hint}")
    train, evaluation = (_fashion_split(folder, *_FASHION_FILES[s]) for s in ("train", "eval"))
    return Splits(train, evaluation, list(FASHION_MNIST_CLASSES))


def _fashion_split(folder: Path, images_file: str, labels_file: str) -> Split:
    images = read_idx(folder / images_file, ndim=3)
    labels = read_idx(folder / labels_file, ndim=1).long()
    if len(images) != len(labels):
        raise UserError(
            f"{folder / images_file} holds {len(images)} images but {folder / labels_file} "
            f"holds {len(labels)} labels; the files do not belong together"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{folder / labels_file}: label {int(labels.max())} is out of range 0..9")
    return images.unsqueeze(1), labels


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An unsigned-byte array in the (gzipped) idx format of MNIST, checked against its header."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:  # unreadable, not gzip, or truncated
        raise UserError(f"{path}: not a readable gzip file ({e}); re-install or re-download it") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != bytes([0, 0, _IDX_UBYTE]) or raw[3] != ndim:
        raise UserError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()}, expected "
            f"0x0000{_IDX_UBYTE:02x}{ndim:02x} (unsigned bytes, {ndim}-d); "
            "the file is damaged or is not this idx file"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise UserError(
            f"{path}: the header declares shape {dims} ({math.prod(dims)} bytes) but "
            f"{len(raw) - header} bytes follow; the file is truncated or damaged"
        )
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy())
