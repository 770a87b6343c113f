"""``moving_fashion``: a video dataset made from Fashion-MNIST, for tests, examples and quick runs, in the
spirit of Moving MNIST; written once as frame folders by ``cmtkd-graph data prepare moving_fashion`` and
read by the ``frame_folders`` reader like any folder of frames.

Each clip is 12 frames of 32x32 RGB (PNG): over fresh dark noise in every frame, a Fashion-MNIST item
(shrunk to 16x16, tinted) stands still while a second one moves one pixel per frame in one of 8
directions (right, down-right, down, ..., up-right) and is drawn over it. The label is the direction: no
single frame tells it (a still frame shows two items and no motion), so a network must compare frames;
chance is 12.5 %. Clip ``i`` of a split is the same on every machine (its placement and tints come
from a generator seeded with ``i``; its direction is ``i mod 8``): 8,000 training clips from the
training items, 2,000 evaluation clips from the test items, two consecutive items per clip (fewer
when the files hold fewer items).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cmtkd_graph.data.clips import FrameFolders
from cmtkd_graph.data.fashion_mnist import read_fashion_mnist
from cmtkd_graph.data.record import register_dataset

CANVAS = 32
ITEM = 16  # Fashion-MNIST's 28x28 items shrunk to this side
STORED_FRAMES = 12
DIRECTIONS = {  # name -> (rows, columns) moved per frame
    "right": (0, 1),
    "down-right": (1, 1),
    "down": (1, 0),
    "down-left": (1, -1),
    "left": (0, -1),
    "up-left": (-1, -1),
    "up": (-1, 0),
    "up-right": (-1, 1),
}
CLIPS = {"train": 8000, "val": 2000}


def shrink(items: torch.Tensor) -> torch.Tensor:
    """uint8 items [N, 28, 28] -> float [N, ITEM, ITEM] in [0, 1] (antialiased)."""
    return F.interpolate(items[:, None].float() / 255, size=(ITEM, ITEM), mode="bilinear", antialias=True)[
        :, 0
    ]


def make_clip(still: torch.Tensor, moving: torch.Tensor, direction: int, seed: int) -> torch.Tensor:
    """One clip: uint8 frames [STORED_FRAMES, 3, CANVAS, CANVAS] of ``moving`` (an item [ITEM, ITEM] in
    [0, 1]) travelling in direction number ``direction`` over ``still``."""
    g = torch.Generator().manual_seed(seed)
    step_r, step_c = list(DIRECTIONS.values())[direction]
    travel = STORED_FRAMES - 1
    room = CANVAS - ITEM

    def start(step: int) -> int:  # the whole path stays on the canvas
        low, high = (travel, room) if step < 0 else (0, room - travel) if step > 0 else (0, room)
        return int(torch.randint(low, high + 1, (), generator=g))

    row, col = start(step_r), start(step_c)
    still_at = [int(v) for v in torch.randint(0, room + 1, (2,), generator=g)]
    tints = torch.randint(96, 256, (2, 3, 1, 1), generator=g).float()
    frames = torch.randint(0, 24, (STORED_FRAMES, 3, CANVAS, CANVAS), generator=g).float()
    for t, frame in enumerate(frames):
        for item, tint, (r, c) in (
            (still, tints[0], still_at),
            (moving, tints[1], (row + t * step_r, col + t * step_c)),
        ):
            window = frame[:, r : r + ITEM, c : c + ITEM]
            window.copy_(torch.maximum(window, item * tint))  # the item over the noise, not dimmed by it
            drawn = item > 0.3
            window[:, drawn] = (item * tint)[:, drawn]  # the moving item, drawn last, covers the still one
    return frames.round().clamp(0, 255).to(torch.uint8)


def write_clips(root: Path, fashion_root: str | None) -> str:
    """Every clip of the Fashion-MNIST files in ``fashion_root`` (default: Debian's) into ``root`` as
    ``<split>/<direction>/<clip>/<frame>.png``; returns what was written."""
    splits = read_fashion_mnist(fashion_root)
    names = list(DIRECTIONS)
    counts = []
    for split, (items, _), seed in (("train", splits.train, 0), ("val", splits.eval, 1 << 30)):
        count = min(CLIPS[split], len(items) // 2)  # fewer from files of fewer items
        small = shrink(items[: 2 * count, 0])
        for index in range(count):
            direction = index % len(names)
            frames = make_clip(small[2 * index], small[2 * index + 1], direction, seed + index)
            folder = root / split / names[direction] / f"{index:06d}"
            folder.mkdir(parents=True)
            for t, frame in enumerate(frames):
                Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"{t:02d}.png")
        counts.append(f"{count} {split}")
    return f"moving fashion: {' and '.join(counts)} clips of {STORED_FRAMES} frames written as frame folders"


@register_dataset("moving_fashion")
class MovingFashion(FrameFolders):
    summary = (
        "video clips made from Fashion-MNIST: which of 8 directions an item moves in (12 frames of 32x32), "
        "as frame folders (data.root default: data/moving_fashion)"
    )
    native_size = CANVAS
    default_frames = 8
    mean = (0.1171, 0.1196, 0.1192)  # of 200 training clips
    std = (0.1638, 0.1702, 0.1699)
    hflip = False  # a flip turns "left" into "right": it would change the label
    how_to_get = "make them with `cmtkd-graph data prepare moving_fashion` (from dataset-fashion-mnist)"
    default_root = "data/moving_fashion"
