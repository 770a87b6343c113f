"""CIFAR-10 and CIFAR-100 in torchvision's python-batch format (``cifar-10-batches-py/``), decoded once.

The batches are read with an unpickler that admits only arrays, lists, dicts and strings
(``safe_files.read_cifar_pickle``), checked, and kept in memory as uint8 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.in_memory import Split, Splits, in_memory_bundle
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.errors import UserError
from cmtkd_graph.safe_files import read_cifar_pickle
from cmtkd_graph.spec import DataSpec


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


class _Cifar(DatasetRecord):
    native_size = 32
    downloadable = True

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        if spec.root is None:
            raise UserError(
                f"data.root: required for {spec.dataset} (the directory that holds, or will hold "
                "with `download: true`, torchvision's cifar-10-batches-py / cifar-100-python folder)"
            )
        return in_memory_bundle(spec, read_cifar(cls.name, spec.root, download=spec.download))


@register_dataset("cifar10")
class CIFAR10(_Cifar):
    summary = "CIFAR-10 in torchvision's format (data.root holds cifar-10-batches-py/)"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


@register_dataset("cifar100")
class CIFAR100(_Cifar):
    summary = "CIFAR-100 in torchvision's format (data.root holds cifar-100-python/)"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
