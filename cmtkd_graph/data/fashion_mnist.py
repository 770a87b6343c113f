"""Fashion-MNIST: the four original gzipped idx files (Debian's ``dataset-fashion-mnist`` by default).

Read once into uint8 tensors, each file checked against its idx header.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.in_memory import Split, Splits, in_memory_bundle
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec

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


@register_dataset("fashion_mnist")
class FashionMNIST(DatasetRecord):
    summary = f"Fashion-MNIST's idx files (data.root default: {FASHION_MNIST_ROOT})"
    native_size = 28
    grey = True
    mean = (0.2860,)
    std = (0.3530,)
    hflip = False
    how_to_get = "install it with `apt-get install dataset-fashion-mnist`"
    default_root = FASHION_MNIST_ROOT

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        return in_memory_bundle(spec, read_fashion_mnist(spec.root))
