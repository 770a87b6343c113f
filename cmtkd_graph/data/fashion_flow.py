"""``fashion_flow``: an optical flow dataset made from Fashion-MNIST the way FlyingChairs was made
(Dosovitskiy et al., FlowNet, ICCV 2015: a background and foreground objects, each moved by its own
random affine motion, the flow known exactly from the motions), written once in FlyingChairs' layout by
``cmtkd-graph data prepare fashion_flow`` and read by the pair reader (``flow_files``).

Each pair is two 128x128 RGB PNGs (RAFT's least input size). The background is a 3x3 mosaic of tinted
items (64 px each, 192x192, centred, so that no motion uncovers an edge); two foreground items (56 to 84
px, tinted) lie on it. The second image moves the background by a similarity about the image centre
(rotation up to 5 degrees, scale 0.95 to 1.05, shift up to 8 px) and each item by its own about its
centre (up to 15 degrees, 0.9 to 1.1, 16 px). Images are drawn by sampling each layer's texture
bilinearly through the inverse of its placement and motion; an item covers the background (and the first
item) where its sampled grey value exceeds 40 of 255. The flow of a pixel of the first image is where
its point goes under the motion of the layer drawn there, minus where it is: exact, occluded points
included (FlyingChairs' convention). Pair ``i`` of a split is the same on every machine (a generator
seeded with ``i``): 1,000 training pairs from the training items, 250 evaluation pairs from the test
items (11 items each; about 260 MB).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cmtkd_graph.data.fashion_mnist import read_fashion_mnist
from cmtkd_graph.data.flow_files import EVAL, SPLIT_FILE, TRAIN, FlowPairFolders, write_flo
from cmtkd_graph.data.record import register_dataset

PAIR_SIZE = 128  # RAFT's least input: its correlation pyramid needs 16 px at 1/8 of the size
MOSAIC = 3  # background items per side
TILE = 64  # background item side
ITEMS = (2.0, 3.0)  # foreground item side: 28 px times a factor in this range
OPAQUE = 40 / 255  # an item covers what is under it where its grey value exceeds this
BACKGROUND_MOTION = (5.0, 0.05, 8.0)  # max rotation (degrees), max scale change, max shift (px)
ITEM_MOTION = (15.0, 0.1, 16.0)
FOREGROUND_ITEMS = 2
ITEMS_PER_PAIR = MOSAIC * MOSAIC + FOREGROUND_ITEMS
PAIRS = {"train": 1000, "val": 250}
SPLIT_SEEDS = {"train": 0, "val": 1 << 30}


def similarity(
    angle: float, scale: float, shift: tuple[float, float], centre: tuple[float, float]
) -> torch.Tensor:
    """3x3 matrix of the rotation by ``angle`` degrees and scaling about ``centre``, then the shift."""
    a, (cx, cy) = math.radians(angle), centre
    c, s = scale * math.cos(a), scale * math.sin(a)
    return torch.tensor(
        [[c, -s, cx - c * cx + s * cy + shift[0]], [s, c, cy - s * cx - c * cy + shift[1]], [0, 0, 1]],
        dtype=torch.float64,
    )


def _random_motion(g: torch.Generator, limits: tuple[float, float, float], centre) -> torch.Tensor:
    angle, scale, shift = limits
    u = (torch.rand(4, generator=g, dtype=torch.float64) * 2 - 1).tolist()
    return similarity(u[0] * angle, 1 + u[1] * scale, (u[2] * shift, u[3] * shift), centre)


def _pixel_centres(size: int) -> torch.Tensor:
    """Homogeneous coordinates [3, size*size] of the pixel centres (x + 0.5, y + 0.5), row by row."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten(), torch.ones(size * size)]).double()


def _sample(texture: torch.Tensor, to_texture: torch.Tensor, size: int) -> torch.Tensor:
    """``texture`` [C, h, w] seen through ``to_texture`` (image pixel -> texture coordinates), bilinear,
    zero outside: [C, size, size]."""
    points = (to_texture @ _pixel_centres(size))[:2]  # continuous texture coordinates
    h, w = texture.shape[-2:]
    grid = torch.stack([points[0] / w * 2 - 1, points[1] / h * 2 - 1], -1).float()
    return F.grid_sample(texture[None], grid.view(1, size, size, 2), align_corners=False)[0]


def make_pair(
    items: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair: uint8 images [3, S, S] (first, second), the flow [2, S, S] of the first to the second
    and the layer drawn at each pixel of the first [S, S] (0: the background, k: the k-th item), from
    ``items`` [ITEMS_PER_PAIR, 28, 28] (uint8)."""
    g = torch.Generator().manual_seed(seed)
    size, mid = PAIR_SIZE, PAIR_SIZE / 2
    tiles = F.interpolate(
        items[: MOSAIC * MOSAIC, None].float() / 255, size=(TILE, TILE), mode="bilinear", antialias=True
    )
    tints = torch.rand(MOSAIC * MOSAIC, 3, 1, 1, generator=g) * 0.6 + 0.4
    mosaic = (
        (tiles * tints)
        .view(MOSAIC, MOSAIC, 3, TILE, TILE)
        .permute(2, 0, 3, 1, 4)
        .reshape(3, MOSAIC * TILE, -1)
    )
    mosaic = mosaic * 0.8 + torch.rand(mosaic.shape, generator=g) * 0.2  # texture where items are dark
    offset = (MOSAIC * TILE - size) / 2
    layers = [
        (
            mosaic,
            similarity(0, 1, (-offset, -offset), (0, 0)),
            _random_motion(g, BACKGROUND_MOTION, (mid, mid)),
        )
    ]
    for item in items[MOSAIC * MOSAIC :]:
        side = 28 * (ITEMS[0] + (ITEMS[1] - ITEMS[0]) * float(torch.rand((), generator=g)))
        left, top = (float(v) for v in torch.rand(2, generator=g, dtype=torch.float64) * (size - side))
        grey = item[None].float() / 255
        tint = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
        texture = torch.cat([grey * tint, grey])  # RGB and the grey value that decides coverage
        place = similarity(0, side / 28, (left, top), (0, 0))  # texture -> image
        centre = (left + side / 2, top + side / 2)
        layers.append((texture, place, _random_motion(g, ITEM_MOTION, centre)))

    images, flow = [], torch.zeros(2, size * size, dtype=torch.float64)
    drawn = torch.zeros(size * size, dtype=torch.long)
    points = _pixel_centres(size)
    for moved in (False, True):
        image = torch.zeros(3, size, size)
        for index, (texture, place, motion) in enumerate(layers):
            to_image = motion @ place if moved else place
            seen = _sample(texture, torch.linalg.inv(to_image), size)
            cover = torch.ones(size, size, dtype=torch.bool) if index == 0 else seen[3] > OPAQUE
            image[:, cover] = seen[:3, cover]
            if not moved:  # the flow of a pixel is its drawn layer's motion
                where = cover.flatten()
                flow[:, where] = (motion @ points[:, where])[:2] - points[:2, where]
                drawn[where] = index
        images.append((image * 255).round().clamp(0, 255).to(torch.uint8))
    return images[0], images[1], flow.view(2, size, size).float(), drawn.view(size, size)


def write_pairs(root: Path, fashion_root: str | None) -> str:
    """Every pair of the Fashion-MNIST files in ``fashion_root`` (default: Debian's) into ``root`` in the
    FlyingChairs layout; returns what was written."""
    splits = read_fashion_mnist(fashion_root)
    data = root / "data"
    data.mkdir(parents=True)
    marks, counts, number = [], [], 0
    for split, (items, _labels), mark in (("train", splits.train, TRAIN), ("val", splits.eval, EVAL)):
        pairs = min(PAIRS[split], len(items) // ITEMS_PER_PAIR)
        for index in range(pairs):
            span = items[index * ITEMS_PER_PAIR : (index + 1) * ITEMS_PER_PAIR, 0]
            first, second, flow, _ = make_pair(span, SPLIT_SEEDS[split] + index)
            number += 1
            for part, image in (("img1", first), ("img2", second)):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(data / f"{number:05d}_{part}.png")
            write_flo(data / f"{number:05d}_flow.flo", flow)
            marks.append(mark)
        counts.append(f"{pairs} {split}")
    (root / SPLIT_FILE).write_text("".join(f"{m}\n" for m in marks))
    return f"fashion flow: {' and '.join(counts)} pairs written in the FlyingChairs layout"


@register_dataset("fashion_flow")
class FashionFlow(FlowPairFolders):
    summary = (
        "optical flow: 128x128 pairs of Fashion-MNIST items moved by known random similarities, exact flow, "
        "in the FlyingChairs layout (data.root default: data/fashion_flow)"
    )
    native_size = PAIR_SIZE
    how_to_get = "make them with `cmtkd-graph data prepare fashion_flow` (from dataset-fashion-mnist)"
    default_root = "data/fashion_flow"
