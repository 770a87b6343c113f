"""``fashion_scenes``: a segmentation dataset made from Fashion-MNIST, for tests, examples and quick runs,
written once in the Pascal VOC layout by ``cmtkd-graph data prepare fashion_scenes`` and read by the
``voc`` reader like any VOC folder.

Each scene is a 64x64 RGB image (a JPEG, as VOC's are) with three Fashion-MNIST items
(training scenes from the training images, evaluation scenes from the test images, three consecutive
items per scene), each tinted with a colour and pasted at a random place over a dark, noisy
background; later items cover earlier ones. The mask gives every pixel its item's class + 1 where the
item is drawn (grey value > 76 of 255), 0 (background) where nothing is, and 255 (unlabelled) on the
faint rim of each item (grey value 13..76), as Pascal VOC marks object boundaries; masks are palette PNGs
with VOC's colours. Scene ``i`` of a split is the same on every machine (its placement comes from a
generator seeded with ``i``): 20,000 training scenes from the 60,000 training items, 3,333 evaluation
scenes from the 10,000 test items.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cmtkd_graph.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from cmtkd_graph.data.record import register_dataset
from cmtkd_graph.data.segmentation_files import UNLABELLED, VOCSegmentation, voc_palette

ITEMS_PER_SCENE = 3
DRAWN = 76  # grey value above which an item's pixel is labelled with its class
RIM = 13  # grey values RIM..DRAWN are the item's rim: unlabelled (255)
SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]


def make_scene(
    items: torch.Tensor, labels: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene: uint8 image [3, size, size] and uint8 mask [size, size] (255: unlabelled) from
    ``items`` [k, 28, 28]."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 24, (3, size, size), generator=g, dtype=torch.uint8)
    mask = torch.zeros(size, size, dtype=torch.uint8)
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
        area[rim] = UNLABELLED
    return image, mask


SCENE_SIZE = 64
JPEG_QUALITY = 95


def write_scenes(root: Path, fashion_root: str | None) -> str:
    """Every scene of the Fashion-MNIST files in ``fashion_root`` (default: Debian's) into ``root`` in
    the VOC layout, with ``labelmap.txt`` naming the classes; returns what was written."""
    splits = read_fashion_mnist(fashion_root)
    palette = voc_palette()
    flat_palette = [v for colour in palette for v in colour]
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    counts = []
    for split, (items, labels), seed in (("train", splits.train, 0), ("val", splits.eval, 1 << 30)):
        ids = []
        for index in range(len(items) // ITEMS_PER_SCENE):
            span = slice(index * ITEMS_PER_SCENE, (index + 1) * ITEMS_PER_SCENE)
            image, mask = make_scene(items[span, 0], labels[span], SCENE_SIZE, seed + index)
            name = f"{split}_{index:06d}"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                root / "JPEGImages" / f"{name}.jpg",
                quality=JPEG_QUALITY,
                subsampling=0,  # 4:4:4: sharp colours
            )
            png = Image.fromarray(mask.numpy(), mode="P")
            png.putpalette(flat_palette)
            png.save(root / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        counts.append(f"{len(ids)} {split}")
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{name}:{','.join(map(str, palette[i]))}::" for i, name in enumerate(SCENE_CLASSES)]
    (root / "labelmap.txt").write_text("\n".join(lines) + "\n")
    return f"fashion scenes: {' and '.join(counts)} scenes written in the VOC layout"


@register_dataset("fashion_scenes")
class FashionScenes(VOCSegmentation):
    summary = (
        "segmentation scenes made from Fashion-MNIST (background + 10 classes, rims unlabelled), in the VOC "
        "layout (data.root default: data/fashion_scenes)"
    )
    native_size = SCENE_SIZE
    mean = (0.1302, 0.1323, 0.1317)  # of 600 training scenes
    std = (0.1897, 0.1939, 0.1930)
    hflip = True  # scenes have no handedness
    how_to_get = "make them with `cmtkd-graph data prepare fashion_scenes` (from dataset-fashion-mnist)"
    default_root = "data/fashion_scenes"
    default_classes = SCENE_CLASSES  # when labelmap.txt is gone: never VOC's
    default_colours = voc_palette()[: len(SCENE_CLASSES)]
