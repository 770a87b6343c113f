"""`build_datasets`: the train and eval datasets a `DataSpec` declares, with their transforms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cmtkd_graph.data.datasets import Splits, TensorImages, read_cifar, read_fashion_mnist
from cmtkd_graph.data.imagefolder import (
    ImageFiles,
    balanced_first,
    check_same_classes,
    find_classes,
    list_samples,
    pick_eval_split,
)
from cmtkd_graph.data.transforms import build_transforms
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec


@dataclass(frozen=True)
class DataBundle:
    """What the rest of the tool needs to know about the data: the two splits and the model's input."""

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_classes: int
    classes: list[str]
    in_channels: int  # 3, or 1 for fashion_mnist with grey_to_rgb: none
    image_size: int  # the model input size
    train_eval: torch.utils.data.Dataset  # the training samples with the evaluation transform

    def skipped_images(self) -> int:
        """Distinct unreadable images skipped so far in both splits (``corrupt_images: skip``; else 0)."""
        return sum(getattr(ds, "skipped", 0) for ds in (self.train, self.eval))


def build_datasets(spec: DataSpec) -> DataBundle:
    """Read the dataset ``spec`` names (raising UserError on missing or malformed data)."""
    if spec.dataset == "imagefolder":
        return _image_folder(spec)
    if spec.dataset == "fashion_mnist":
        return _in_memory(spec, read_fashion_mnist(spec.root))
    if spec.root is None:
        raise UserError(
            f"data.root: required for {spec.dataset} (the directory that holds, or will hold "
            "with `download: true`, torchvision's cifar-10-batches-py / cifar-100-python folder)"
        )
    return _in_memory(spec, read_cifar(spec.dataset, spec.root, download=spec.download))


def _root_of(spec: DataSpec) -> str:
    return spec.root or "the default location"


def _in_memory(spec: DataSpec, splits: Splits) -> DataBundle:
    (train_x, train_y), (eval_x, eval_y) = splits.train, splits.eval
    grey = train_x.shape[1] == 1
    in_channels = spec.in_channels  # 1 only for fashion_mnist with grey_to_rgb: none
    native = train_x.shape[-1]
    size = spec.input_size  # image_size, or the dataset's native size (the spec's table, checked below)
    if spec.image_size is None and native != size:
        raise UserError(
            f"{spec.dataset} images at {_root_of(spec)} are {native}x{native}, not {size}x{size}; "
            f"set data.image_size: {native} to use them as they are"
        )
    train_tf, eval_tf = build_transforms(
        spec, size=size, native_size=native, in_channels=in_channels, grey_source=grey
    )
    return DataBundle(
        train=TensorImages(train_x[: spec.train_subset], train_y[: spec.train_subset], train_tf),
        eval=TensorImages(eval_x[: spec.eval_subset], eval_y[: spec.eval_subset], eval_tf),
        num_classes=len(splits.classes),
        classes=splits.classes,
        in_channels=in_channels,
        image_size=size,
        train_eval=TensorImages(train_x[: spec.train_subset], train_y[: spec.train_subset], eval_tf),
    )


def _image_folder(spec: DataSpec) -> DataBundle:
    if spec.root is None:
        raise UserError("data.root: required for imagefolder (the directory of train/ and val/ or test/)")
    root = Path(spec.root)
    if not root.is_dir():
        raise UserError(
            f"data.root: {root} is not a directory (expected {root}/train/<class>/<images> and "
            f"{root}/val/ or {root}/test/ alike)"
        )
    train_dir = root / "train"
    eval_dir = root / pick_eval_split(root, spec.eval_split)
    classes = find_classes(train_dir)
    check_same_classes(classes, find_classes(eval_dir), eval_dir)
    size = spec.input_size
    train_tf, eval_tf = build_transforms(spec, size=size, native_size=None, in_channels=3)
    train = balanced_first(list_samples(train_dir, classes), spec.train_subset)
    evaluation = balanced_first(list_samples(eval_dir, classes), spec.eval_subset)
    return DataBundle(
        train=ImageFiles(train, classes, train_tf, spec.corrupt_images),
        eval=ImageFiles(evaluation, classes, eval_tf, spec.corrupt_images),
        num_classes=len(classes),
        classes=classes,
        in_channels=3,
        image_size=size,
        train_eval=ImageFiles(train, classes, eval_tf, spec.corrupt_images),
    )
