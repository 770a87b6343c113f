"""Datasets small enough to decode once into memory (CIFAR, Fashion-MNIST): the splits as uint8 tensors.

Each split is decoded once into a uint8 tensor (N, C, H, W), so that per-sample work is a tensor
transform rather than a PIL decode: the whole of Fashion-MNIST loads in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.transforms import build_transforms
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec

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


def in_memory_bundle(spec: DataSpec, splits: Splits) -> DataBundle:
    """The bundle of decoded splits: subsets, transforms, and the input size checked against the images."""
    (train_x, train_y), (eval_x, eval_y) = splits.train, splits.eval
    grey = train_x.shape[1] == 1
    in_channels = spec.in_channels  # 1 only for grey images with grey_to_rgb: none
    native = train_x.shape[-1]
    size = spec.input_size  # image_size, or the dataset's native size (its record, checked below)
    if spec.image_size is None and native != size:
        raise UserError(
            f"{spec.dataset} images at {spec.root or 'the default location'} are {native}x{native}, not "
            f"{size}x{size}; set data.image_size: {native} to use them as they are"
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
