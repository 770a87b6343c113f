"""Optical flow data in the format its users have: image pairs with ``.flo`` files, the Middlebury format
that FlyingChairs, Sintel and RAFT's tools read and write.

A ``.flo`` file is little-endian: the float32 ``202021.25`` (the bytes ``PIEH``), int32 width, int32
height, then ``height x width x 2`` float32 values, row by row, (u, v) per pixel: the horizontal and
vertical displacement, in pixels, of each pixel of the first image. :func:`read_flo` returns it as a
tensor ``[2, H, W]`` (channel 0: u); :func:`write_flo` writes one.

A pair folder has FlyingChairs' layout: ``data/NNNNN_img1.EXT``, ``data/NNNNN_img2.EXT`` and
``data/NNNNN_flow.flo`` (EXT: ``ppm``, ``png`` or ``jpg``), and ``FlyingChairs_train_val.txt`` with one
line per pair in name order, ``1`` for training and ``2`` for evaluation. A pair with a missing image or
flow, images of different sizes, a flow whose size differs from its images', or a ``.flo`` with a wrong
magic number or a size its header does not promise stops with one line naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.spec import DataSpec
from cmtkd_graph.tasks.flow import UNKNOWN_FLOW

FLO_MAGIC = 202021.25
"""The first four bytes of a ``.flo`` file as a little-endian float32 (the ASCII bytes ``PIEH``)."""
FLO_HEADER_BYTES = 12
MAX_FLO_SIDE = 100_000  # a header promising more is not a flow file (Middlebury's readers use 1e5 too)
PAIR_IMAGE_EXTENSIONS = (".ppm", ".png", ".jpg", ".jpeg")
SPLIT_FILE = "FlyingChairs_train_val.txt"
TRAIN, EVAL = "1", "2"  # the split file's marks


class BadFlowFile(UserError):
    """A ``.flo`` file that is not one (wrong magic number, a size its header does not promise)."""


def read_flo(path: str | Path) -> torch.Tensor:
    """The flow of a ``.flo`` file as float32 ``[2, H, W]`` (u, v); a BadFlowFile names what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the flow file ({first_line(err)})") from None
    if len(raw) < FLO_HEADER_BYTES:
        raise BadFlowFile(f"{path}: {len(raw)} bytes, shorter than a .flo header (12); not a flow file")
    magic = np.frombuffer(raw, "<f4", 1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise BadFlowFile(
            f"{path}: magic number {raw[:4]!r} where a .flo file has b'PIEH' (202021.25); not a flow file"
        )
    width, height = (int(v) for v in np.frombuffer(raw, "<i4", 2, offset=4))
    if not (0 < width <= MAX_FLO_SIDE and 0 < height <= MAX_FLO_SIDE):
        raise BadFlowFile(f"{path}: its header says {width}x{height} pixels; not a flow file")
    expected = FLO_HEADER_BYTES + width * height * 2 * 4
    if len(raw) != expected:
        raise BadFlowFile(
            f"{path}: {len(raw)} bytes where a {width}x{height} flow has {expected}; the file is "
            f"{'truncated' if len(raw) < expected else 'longer than its header says'}"
        )
    values = np.frombuffer(raw, "<f4", width * height * 2, offset=FLO_HEADER_BYTES)
    return torch.from_numpy(values.reshape(height, width, 2).transpose(2, 0, 1).copy())


def write_flo(path: str | Path, flow: torch.Tensor) -> None:
    """Write ``flow`` ``[2, H, W]`` (u, v; any float dtype) as a ``.flo`` file."""
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"a flow is [2, H, W], got {tuple(flow.shape)}")
    _, height, width = flow.shape
    header = np.array([FLO_MAGIC], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    values = flow.detach().cpu().float().permute(1, 2, 0).contiguous().numpy().astype("<f4")
    Path(path).write_bytes(header + values.tobytes())


# ---------------------------------------------------------------------------- pair folders
@dataclass(frozen=True)
class FlowPair:
    """The files of one sample: the two images and the flow of the first to the second."""

    first: Path
    second: Path
    flow: Path


_PAIR_FILE = re.compile(r"^(?P<name>.+)_(?P<part>img1|img2|flow)(?P<ext>\.[A-Za-z]+)$")


def pair_files(root: Path) -> tuple[list[FlowPair], list[FlowPair]]:
    """The (training, evaluation) pairs of a FlyingChairs-layout folder, in name order."""
    data = root / "data"
    if not data.is_dir():
        raise UserError(
            f"{root}: no data/ folder; a flow folder holds data/NNNNN_img1.png, data/NNNNN_img2.png and "
            f"data/NNNNN_flow.flo (the FlyingChairs layout)"
        )
    parts: dict[str, dict[str, Path]] = {}
    for path in sorted(data.iterdir()):
        match = _PAIR_FILE.match(path.name)
        if match is None:
            continue
        part, ext = match["part"], match["ext"].lower()
        if (part == "flow") != (ext == ".flo") or (part != "flow" and ext not in PAIR_IMAGE_EXTENSIONS):
            continue
        parts.setdefault(match["name"], {})[part] = path
    pairs = []
    for name in sorted(parts):
        found = parts[name]
        missing = [p for p in ("img1", "img2", "flow") if p not in found]
        if missing:
            have = next(iter(found.values()))
            raise UserError(
                f"{have}: its pair {name!r} has no {' and no '.join(missing)} file in {data}; a pair is "
                f"{name}_img1, {name}_img2 and {name}_flow.flo"
            )
        pairs.append(FlowPair(found["img1"], found["img2"], found["flow"]))
    if not pairs:
        raise UserError(f"{data}: no image pairs (NNNNN_img1.png, NNNNN_img2.png, NNNNN_flow.flo)")
    marks = _split_marks(root / SPLIT_FILE, len(pairs))
    train = [p for p, m in zip(pairs, marks, strict=True) if m == TRAIN]
    held_out = [p for p, m in zip(pairs, marks, strict=True) if m == EVAL]
    return train, held_out


def _split_marks(path: Path, count: int) -> list[str]:
    if not path.is_file():
        raise UserError(
            f"{path}: missing; it says which pairs train (1) and which evaluate (2), one line per pair "
            f"in name order, as FlyingChairs' does"
        )
    marks = path.read_text().split()
    bad = sorted(set(marks) - {TRAIN, EVAL})
    if bad:
        raise UserError(f"{path}: marks {', '.join(bad[:3])}; each line is 1 (training) or 2 (evaluation)")
    if len(marks) != count:
        raise UserError(f"{path}: {len(marks)} lines for {count} pairs in data/; one line per pair")
    return marks


def read_pair(pair: FlowPair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two images (uint8 ``[3, H, W]``) and the flow (float32 ``[2, H, W]``) of a pair; a UserError
    names a file whose size differs from the first image's."""
    first, second = read_rgb(pair.first), read_rgb(pair.second)
    if first.shape != second.shape:
        raise UserError(
            f"{pair.second}: {_size(second)} but {pair.first.name} is {_size(first)}; the two images "
            f"of a pair have one size"
        )
    flow = read_flo(pair.flow)
    if flow.shape[1:] != first.shape[1:]:
        raise UserError(
            f"{pair.flow}: a {_size(flow)} flow for {_size(first)} images; a flow has its images' size"
        )
    return first, second, flow


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as uint8 ``[3, H, W]`` (a UserError names a file PIL cannot read)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as err:
        raise UserError(f"{path}: not an image PIL can read ({first_line(err)})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _size(t: torch.Tensor) -> str:
    return f"{t.shape[-1]}x{t.shape[-2]}"


# ---------------------------------------------------------------------------- the flow datasets
class FlowPairs(Dataset):
    """Pairs as samples: ``([3, 2, S, S] float, normalised; [2, S, S] flow in pixels of the S x S
    input)``. Pairs of another size are resized to S x S, the flow scaled with them (unknown flow stays
    unknown). ``hflip``: mirror half the training pairs (the first image, the second, and the flow, whose
    horizontal component changes sign), RAFT's own augmentation for FlyingChairs."""

    def __init__(
        self,
        pairs: list[FlowPair],
        *,
        size: int,
        mean: list[float] | None,
        std: list[float] | None,
        hflip: bool = False,
    ):
        self.pairs, self.size, self.hflip = pairs, size, hflip
        self.mean = None if mean is None else torch.tensor(mean).view(3, 1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, second, flow = read_pair(self.pairs[index])
        images = torch.stack([first, second], 1).float() / 255  # [3, 2, H, W]
        if images.shape[-2:] != (self.size, self.size):
            images, flow = _resized(images, flow, self.size)
        if self.hflip and bool(torch.rand(()) < 0.5):
            images = images.flip(-1)
            flow = flow.flip(-1) * torch.tensor([-1.0, 1.0]).view(2, 1, 1)
        if self.mean is not None:
            images = (images - self.mean) / self.std
        return images, flow


def _resized(images: torch.Tensor, flow: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[3, 2, H, W]`` and their flow at ``size x size``: displacements scale with the sides."""
    height, width = flow.shape[-2:]
    images = F.interpolate(images.movedim(1, 0), size=(size, size), mode="bilinear", antialias=True)
    known = (flow.abs() < UNKNOWN_FLOW).all(0)
    scale = torch.tensor([size / width, size / height]).view(2, 1, 1)
    moved = F.interpolate((flow * known)[None], size=(size, size), mode="bilinear")[0] * scale
    still_known = F.interpolate(known[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0
    flow = torch.where(still_known, moved, torch.full_like(moved, 2 * UNKNOWN_FLOW))
    return images.clamp(0, 1).movedim(0, 1), flow


@register_dataset("flow_pairs")
class FlowPairFolders(DatasetRecord):
    summary = (
        "optical flow: image pairs with .flo flows in the FlyingChairs layout (data/NNNNN_img1|img2.EXT, "
        "data/NNNNN_flow.flo, FlyingChairs_train_val.txt) in data.root"
    )
    task = "flow"
    mean = (0.5, 0.5, 0.5)  # RAFT's own input scaling: [0, 1] to [-1, 1] (torchvision's OpticalFlow preset)
    std = (0.5, 0.5, 0.5)
    device_pipeline = False
    how_to_get = "a FlyingChairs-layout folder (or `cmtkd-graph data prepare fashion_flow`)"

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        from cmtkd_graph.data.transforms import mean_std

        train_pairs, eval_pairs = pair_files(cls.root(spec))
        if spec.train_subset is not None:
            train_pairs = train_pairs[: spec.train_subset]
        if spec.eval_subset is not None:
            eval_pairs = eval_pairs[: spec.eval_subset]
        mean, std = mean_std(spec, 3)
        hflip = spec.augment.hflip if spec.augment.hflip is not None else cls.hflip
        size = spec.input_size

        def pairs(chosen: list[FlowPair], flip: bool) -> FlowPairs:
            return FlowPairs(chosen, size=size, mean=mean, std=std, hflip=flip)

        return DataBundle(
            train=pairs(train_pairs, hflip),
            eval=pairs(eval_pairs, False),
            num_classes=0,
            classes=[],
            in_channels=3,
            image_size=size,
            train_eval=pairs(train_pairs, False),
            frames=2,
        )
