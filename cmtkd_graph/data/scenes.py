"""``fashion_scenes``: a segmentation dataset made from Fashion-MNIST, for tests, examples and quick runs.

Each scene is a square RGB image (``data.image_size``, default 64) with three Fashion-MNIST items
(training scenes from the training images, evaluation scenes from the test images, three consecutive
items per scene), each tinted with a colour and pasted at a random place over a dark, noisy
background; later items cover earlier ones. The mask gives every pixel its item's class + 1 where the
item is drawn (grey value > 76 of 255), 0 (background) where nothing is, and ``IGNORE`` on the faint rim
of each item (grey value 13..76), as Pascal VOC marks object boundaries. Scene ``i`` is the same on every
machine (its placement comes from a generator seeded with ``i``), so runs and tests are reproducible.

Needs the Fashion-MNIST files (Debian's ``dataset-fashion-mnist``, or ``data.root``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_fashion_mnist
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.data.transforms import ScaleNormalize, mean_std
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec
from cmtkd_graph.tasks import IGNORE

ITEMS_PER_SCENE = 3
DRAWN = 76  # grey value above which an item's pixel is labelled with its class
RIM = 13  # grey values RIM..DRAWN are the item's rim: IGNORE
SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]


def make_scene(
    items: torch.Tensor, labels: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene: uint8 image [3, size, size] and int64 mask [size, size] from ``items`` [k, 28, 28]."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 24, (3, size, size), generator=g, dtype=torch.uint8)
    mask = torch.zeros(size, size, dtype=torch.long)
    side = items.shape[-1]
    for item, label in zip(items, labels, strict=True):
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        colour = torch.randint(96, 256, (3, 1, 1), generator=g).float() / 255
        grey = item.float()
        drawn, rim = grey > DRAWN, (grey >= RIM) & (grey <= DRAWN)
        window = image[:, top : top + side, left : left + side]
        tinted = (grey * colour).round().to(torch.uint8)
        window[:, grey >= RIM] = tinted[:, grey >= RIM]
        area = mask[top : top + side, left : left + side]
        area[drawn] = int(label) + 1
        area[rim] = IGNORE
    return image, mask


class FashionScenes(Dataset):
    """Scenes made on access from the items of one Fashion-MNIST split; ``transform`` takes and returns
    (tv_tensors.Image, tv_tensors.Mask)."""

    def __init__(
        self,
        items: torch.Tensor,
        labels: torch.Tensor,
        size: int,
        count: int,
        seed: int,
        transform: Callable | None = None,
    ):
        self.items, self.labels, self.size, self.count, self.seed = items, labels, size, count, seed
        self.transform = transform

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        span = slice(index * ITEMS_PER_SCENE, (index + 1) * ITEMS_PER_SCENE)
        image, mask = make_scene(self.items[span, 0], self.labels[span], self.size, self.seed + index)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def segmentation_transforms(spec: DataSpec, in_channels: int) -> tuple[Callable, Callable]:
    """(train, eval) transforms of (image, mask) pairs: the same crop and flip for both (the mask padded
    with IGNORE), then the image alone scaled and normalised."""
    augment = spec.augment
    crop = augment.crop or "random_crop"
    if crop == "random_resized_crop":
        raise UserError("data.augment.crop: random_resized_crop is not offered for segmentation masks yet")
    geometry = []
    if crop == "random_crop":
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
        geometry.append(v2.RandomCrop(spec.input_size, padding=augment.padding, fill=fill))
    if augment.hflip if augment.hflip is not None else DATASETS_HFLIP:
        geometry.append(v2.RandomHorizontalFlip())
    image_only = ImageOnly(ScaleNormalize(*mean_std(spec, in_channels)))
    return v2.Compose([*geometry, image_only]), image_only


class ImageOnly(torch.nn.Module):
    """Apply ``transform`` to the image of an (image, mask) pair (scaling and normalising)."""

    def __init__(self, transform: Callable):
        super().__init__()
        self.transform = transform

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tv_tensors.wrap(self.transform(image), like=image), mask


DATASETS_HFLIP = True  # scenes have no handedness


@register_dataset("fashion_scenes")
class FashionScenesRecord(DatasetRecord):
    summary = (
        "segmentation scenes made from Fashion-MNIST: background + 10 classes, rims ignored "
        f"(data.root default: {FASHION_MNIST_ROOT})"
    )
    task = "segmentation"
    native_size = 64
    mean = (0.1302, 0.1323, 0.1317)  # of 600 training scenes at 64 px
    std = (0.1897, 0.1939, 0.1930)
    hflip = DATASETS_HFLIP
    how_to_get = "install Fashion-MNIST with `apt-get install dataset-fashion-mnist`"
    default_root = FASHION_MNIST_ROOT
    device_pipeline = False

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        size = spec.input_size
        if size < 28:
            raise UserError(f"data.image_size: fashion_scenes needs at least 28 (an item's side), got {size}")
        splits = read_fashion_mnist(spec.root)
        train_tf, eval_tf = segmentation_transforms(spec, 3)

        def scenes(split, seed: int, subset: int | None, transform) -> FashionScenes:
            items, labels = split
            count = len(items) // ITEMS_PER_SCENE
            return FashionScenes(items, labels, size, min(count, subset or count), seed, transform)

        return DataBundle(
            train=scenes(splits.train, 0, spec.train_subset, train_tf),
            eval=scenes(splits.eval, 1 << 30, spec.eval_subset, eval_tf),
            num_classes=len(SCENE_CLASSES),
            classes=list(SCENE_CLASSES),
            in_channels=3,
            image_size=size,
            train_eval=scenes(splits.train, 0, spec.train_subset, eval_tf),
        )
