"""``fashion_objects``: a detection dataset made from Fashion-MNIST, for tests, examples and quick runs,
written once in the COCO layout by ``cmtkd-graph data prepare fashion_objects`` and read by the COCO
reader (``detection_files.read_coco``) like any COCO folder.

Each scene is a 128x128 RGB JPEG (quality 90, 4:2:0; about 150 MB in all) with three Fashion-MNIST items
(training scenes from the training images, evaluation scenes from the test images, three consecutive
items per scene), each scaled by a random factor in [1, 2.5] (28 to 70 pixels), tinted with a colour and
pasted at a random place over a dark, noisy background; later items cover earlier ones. Every annotation
is exact, computed from the pixels drawn: an object is the item's pixels brighter than 76 of 255 that no
later item covers (its mask, as compressed RLE), its box is the tight box of that mask, its keypoints
are the mask's four extreme points (topmost, rightmost, bottommost, leftmost pixel, as pixel indices
like COCO's, all visible: for Keypoint R-CNN); an item of which fewer than 16 such pixels remain visible
is not annotated. Scene ``i`` of a split is the same on every machine (a generator seeded with ``i``):
20,000 training scenes from the 60,000 training items, 3,333 evaluation scenes from the 10,000 test
items.

Layout: ``train/NNNNNN.jpg``, ``val/NNNNNN.jpg``, ``annotations/instances_train.json`` and
``annotations/instances_val.json`` (COCO's, categories 1..10 with Fashion-MNIST's names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cmtkd_graph.coco import encode_mask
from cmtkd_graph.data.detections import CocoFolder
from cmtkd_graph.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from cmtkd_graph.data.record import register_dataset

SCENE_SIZE = 128
ITEMS_PER_SCENE = 3
SCALES = (1.0, 2.5)  # an item's side: 28 px times a factor drawn in this range
DRAWN = 76  # grey value above which an item's pixel belongs to the object
PAINTED = 13  # grey value from which an item's pixel is painted (its faint rim too)
MIN_VISIBLE = 16  # an item with fewer visible object pixels is not annotated
KEYPOINT_NAMES = ["top", "right", "bottom", "left"]
JPEG_QUALITY = 90  # with 4:2:0 chroma, as COCO's photographs: 5 kB a scene (noise compresses badly)
SPLITS = (("train", 0), ("val", 1 << 30))  # split, seed of its scene 0


def make_scene(items: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """One scene: uint8 image [3, S, S] and its objects ``{"label", "mask" [S, S] bool}`` (in drawing
    order, hidden ones left out) from ``items`` [k, 28, 28]."""
    g = torch.Generator().manual_seed(seed)
    size = SCENE_SIZE
    image = torch.randint(0, 24, (3, size, size), generator=g, dtype=torch.uint8)
    owner = torch.full((size, size), -1, dtype=torch.long)  # which item's object pixel is on top
    painted_by = torch.full((size, size), -1, dtype=torch.long)
    for index, item in enumerate(items):
        factor = SCALES[0] + (SCALES[1] - SCALES[0]) * float(torch.rand((), generator=g))
        side = round(item.shape[-1] * factor)
        grey = F.interpolate(item[None, None].float(), size=(side, side), mode="bilinear", antialias=True)
        grey = grey[0, 0]
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        colour = torch.randint(96, 256, (3, 1, 1), generator=g).float() / 255
        window = (slice(top, top + side), slice(left, left + side))
        painted = grey >= PAINTED
        tinted = (grey * colour).round().clamp(0, 255).to(torch.uint8)
        image[:, window[0], window[1]][:, painted] = tinted[:, painted]
        painted_by[window][painted] = index
        owner[window][grey > DRAWN] = index
    objects = []
    for index, label in enumerate(labels.tolist()):
        mask = (owner == index) & (painted_by == index)
        if int(mask.sum()) >= MIN_VISIBLE:
            objects.append({"label": int(label), "mask": mask})
    return image, objects


def annotation(mask: torch.Tensor) -> dict:
    """The COCO fields of one object's mask: tight box, area, RLE, extreme-point keypoints."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def point(i: int) -> list[float]:  # a pixel's indices, as COCO's files write keypoints
        return [float(xs[i]), float(ys[i]), 2.0]

    # nonzero is in row-major order: the first pixel is the topmost (leftmost of its row), the last the
    # bottommost; the extreme columns are found by argmin/argmax (the first in row-major order)
    points = [point(0), point(int(xs.argmax())), point(len(xs) - 1), point(int(xs.argmin()))]
    return {
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": int(mask.sum()),
        "segmentation": encode_mask(mask),
        "keypoints": [v for p in points for v in p],
        "num_keypoints": len(points),
        "iscrowd": 0,
    }


def write_objects(root: Path, fashion_root: str | None) -> str:
    """Every scene of the Fashion-MNIST files in ``fashion_root`` (default: Debian's) into ``root`` in the
    COCO layout; returns what was written."""
    splits = read_fashion_mnist(fashion_root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "fashion", "keypoints": KEYPOINT_NAMES,
         "skeleton": [[1, 2], [2, 3], [3, 4], [4, 1]]}
        for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]  # fmt: skip
    counts = []
    for (split, seed), (items, labels) in zip(SPLITS, (splits.train, splits.eval), strict=True):
        (root / split).mkdir()
        images, annotations = [], []
        for index in range(len(items) // ITEMS_PER_SCENE):
            span = slice(index * ITEMS_PER_SCENE, (index + 1) * ITEMS_PER_SCENE)
            image, objects = make_scene(items[span, 0], labels[span], seed + index)
            name = f"{index:06d}.jpg"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                root / split / name, quality=JPEG_QUALITY, subsampling=2
            )
            images.append({"id": index + 1, "file_name": name, "width": SCENE_SIZE, "height": SCENE_SIZE})
            for o in objects:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": index + 1, "category_id": o["label"] + 1,
                     **annotation(o["mask"])}
                )  # fmt: skip
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        counts.append(f"{len(images)} {split} ({len(annotations)} objects)")
    return f"fashion objects: {' and '.join(counts)} scenes written in the COCO layout"


@register_dataset("fashion_objects")
class FashionObjects(CocoFolder):
    summary = (
        "detection: 128x128 scenes of three Fashion-MNIST items with exact boxes, masks and keypoints, in "
        "the COCO layout (data.root default: data/fashion_objects)"
    )
    native_size = SCENE_SIZE
    how_to_get = "make them with `cmtkd-graph data prepare fashion_objects` (from dataset-fashion-mnist)"
    default_root = "data/fashion_objects"
    splits = (("train",), ("val",))
