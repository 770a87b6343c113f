"""Per-dataset train/eval transforms: the paper's augmentations and mean/std normalisation.

Small images (CIFAR, Fashion-MNIST, image folders under 64 px): RandomCrop(size, padding) +
horizontal flip, evaluated as is (resized first when image_size is not the native size; folders are
resized and centre-cropped to a square). ImageNet-like folders: RandomResizedCrop(size) + flip, evaluated
as Resize(size / 0.875) + CenterCrop(size). In-memory datasets are transformed as uint8 tensors
(fast); image folders as PIL images, converted to a tensor after the crop. Segmentation pairs (image,
mask) take the same geometry together (``build_segmentation_transforms``), and so do the frames of a
clip (``build_clip_transforms``).

Classification may add torchvision's automatic policies (``data.augment.policy``) after the crop and
flip, and random erasing after normalising; batch mixing (MixUp/CutMix) is ``cmtkd_graph.data.mixing``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cmtkd_graph.registry import DATASETS
from cmtkd_graph.spec import IMAGENET_LIKE_MIN_SIZE, DataSpec
from cmtkd_graph.tasks import IGNORE

EVAL_CROP_FRACTION = 0.875
"""ImageNet-like evaluation: resize to size / 0.875 (256 for 224), then centre-crop size."""


class ScaleNormalize(torch.nn.Module):
    """uint8 (C, H, W) -> float (x / 255 - mean) / std in one multiply-add.

    v2's ToDtype + Normalize + ToPureTensor cost about 4x more, and dominate the per-sample time of
    in-memory datasets. Without mean/std it only scales to [0, 1].
    """

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        mean_ = torch.tensor(mean if mean is not None else [0.0]).view(-1, 1, 1)
        std_ = torch.tensor(std if std is not None else [1.0]).view(-1, 1, 1)
        self.scale = 1 / (255 * std_)
        self.shift = -mean_ / std_

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.as_subclass(torch.Tensor).float().mul_(self.scale).add_(self.shift)


class RepeatChannels(torch.nn.Module):
    """Grey (1, H, W) -> (channels, H, W) by repetition, for RGB models."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(self.channels, -1, -1)


def build_transforms(
    spec: DataSpec, *, size: int, native_size: int | None, in_channels: int, grey_source: bool = False
) -> tuple[Callable, Callable]:
    """(train, eval) transforms producing float (in_channels, size, size) tensors.

    ``native_size`` is the side of a dataset's square images, or None for image folders (any size,
    decoded by PIL); ``grey_source`` repeats a 1-channel image up to ``in_channels``.
    """
    train_geometry, eval_geometry = _geometry(spec, size, native_size)
    tail = [v2.PILToTensor()] if native_size is None else []
    if grey_source and in_channels > 1:
        tail.append(RepeatChannels(in_channels))
    tail.append(ScaleNormalize(*mean_std(spec, in_channels)))
    policy, erasing = _policy(spec.augment.policy), _erasing(spec.augment.random_erasing)
    return v2.Compose([*train_geometry, *policy, *tail, *erasing]), v2.Compose([*eval_geometry, *tail])


POLICIES: dict[str, Callable[[], torch.nn.Module]] = {
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
    "randaugment": v2.RandAugment,
    "trivialaugment_wide": v2.TrivialAugmentWide,
    "augmix": v2.AugMix,
}
"""``data.augment.policy`` -> torchvision's transform with its default settings (as torchvision's
classification reference builds them), applied to the uint8 image after the crop and flip."""


def _policy(name: str) -> list[torch.nn.Module]:
    return [] if name == "none" else [POLICIES[name]()]


def _erasing(probability: float) -> list[torch.nn.Module]:
    """v2.RandomErasing on the normalised image (erased pixels become 0, the mean), as torchvision's
    reference does after Normalize."""
    return [v2.RandomErasing(p=probability, value=0)] if probability else []


def build_segmentation_transforms(
    spec: DataSpec, *, size: int, native_size: int | None
) -> tuple[Callable, Callable]:
    """(train, eval) transforms of (image, mask) pairs: a uint8 ``tv_tensors.Image`` [3, H, W] and a
    ``tv_tensors.Mask`` [H, W] take the same geometry (the mask resized by nearest neighbour, padded with
    ``IGNORE``), then the image alone is scaled and normalised. Images of any size are evaluated with
    their short side resized to ``size`` and centre-cropped to a square, without classification's 0.875
    margin (the long side's ends are not scored)."""
    train_geometry, eval_geometry = _geometry(spec, size, native_size, masks=True)
    image_only = ImageOnly(ScaleNormalize(*mean_std(spec, 3)))
    return v2.Compose([*train_geometry, image_only]), v2.Compose([*eval_geometry, image_only])


def build_clip_transforms(spec: DataSpec, *, size: int, native_size: int | None) -> tuple[Callable, Callable]:
    """(train, eval) transforms of uint8 clips [T, 3, H, W] to float [3, T, H, W]: every frame takes the
    same geometry (the clip is one ``tv_tensors.Video``), as classification's images would, then the
    frames are scaled and normalised and time moves behind the channels (torchvision's video models'
    input)."""
    train_geometry, eval_geometry = _geometry(spec, size, native_size)
    tail = [ScaleNormalize(*mean_std(spec, 3)), ChannelsBeforeTime()]
    return v2.Compose([AsVideo(), *train_geometry, *tail]), v2.Compose([AsVideo(), *eval_geometry, *tail])


class AsVideo(torch.nn.Module):
    """uint8 frames [T, C, H, W] as one ``tv_tensors.Video``: v2 transforms draw one set of random
    parameters for all its frames."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return tv_tensors.Video(frames)


class ChannelsBeforeTime(torch.nn.Module):
    """[T, C, H, W] -> [C, T, H, W]."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()


class ImageOnly(torch.nn.Module):
    """Apply ``transform`` to the image of an (image, mask) pair (scaling and normalising)."""

    def __init__(self, transform: Callable):
        super().__init__()
        self.transform = transform

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tv_tensors.wrap(self.transform(image), like=image), mask


MASK_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
"""Padding of an (image, mask) pair: black image, unlabelled mask."""


def _geometry(spec: DataSpec, size: int, native_size: int | None, masks: bool = False) -> tuple[list, list]:
    augment = spec.augment
    imagenet_like = native_size is None and size >= IMAGENET_LIKE_MIN_SIZE
    crop = augment.crop or ("random_resized_crop" if imagenet_like else "random_crop")
    hflip = augment.hflip if augment.hflip is not None else DATASETS.get(spec.dataset).hflip

    if native_size is None:  # any size and aspect: resize the short side, then make it square
        fit = [v2.Resize(size), v2.CenterCrop(size)]
        resized = [v2.Resize(round(size / EVAL_CROP_FRACTION)), v2.CenterCrop(size)]
        evaluation = resized if imagenet_like and not masks else fit
    else:  # square images: only a resize when the model wants another size
        fit = [] if native_size == size else [v2.Resize(size)]
        evaluation = fit
    train = {
        "random_crop": [*fit, v2.RandomCrop(size, padding=augment.padding, fill=MASK_FILL if masks else 0)],
        "random_resized_crop": [v2.RandomResizedCrop(size)],
        "none": fit,
    }[crop]
    if hflip:
        train = [*train, v2.RandomHorizontalFlip()]
    return train, evaluation


def mean_std(spec: DataSpec, channels: int) -> tuple[list[float] | None, list[float] | None]:
    """The per-channel mean and std to normalise with (checked when the spec was read), or None."""
    if not spec.normalize:
        return None, None
    record = DATASETS.get(spec.dataset)  # its training set's per-channel mean and std
    mean = spec.mean if spec.mean is not None else list(record.mean)
    std = spec.std if spec.std is not None else list(record.std)
    return _per_channel(mean, channels), _per_channel(std, channels)


def _per_channel(values: list[float], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)
