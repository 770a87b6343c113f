"""Segmentation data in the two layouts users have: Pascal VOC (``voc``) and image/mask folders
(``mask_folders``), decoded with PIL on access.

A mask is a PNG of class indices: a palette PNG (VOC's ``SegmentationClass/``: the index is the class,
the palette only colours it) or a grey one, with 255 for "not labelled" (VOC's object boundaries), which
becomes ``IGNORE`` (so a binary mask must mark its foreground 1, not 255). An RGB mask (what annotation
tools such as CVAT export) is read through the colours of ``labelmap.txt``. The class names come from
``labelmap.txt`` (CVAT's and VOC exports' ``name:r,g,b::`` lines) or ``classes.txt`` (one name per line)
in the data root; a VOC root without either has VOC's 21 classes.

A mask value that is neither a class nor 255, a colour no class has, or a mask whose size differs from
its image's stops the run with one line naming the file and the value; an image or mask PIL cannot
decode is a `CorruptImageError` (or skipped and counted with ``data.corrupt_images: skip``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.imagefolder import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageFiles,
    image_paths,
    pick_eval_split,
)
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.data.transforms import build_segmentation_transforms
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec
from cmtkd_graph.tasks import IGNORE

UNLABELLED = 255
"""The mask value of pixels that count in no loss and no metric (VOC's object boundaries)."""

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

Colour = tuple[int, int, int]


def voc_palette() -> list[Colour]:
    """VOC's colour of each index 0..255: the index's bits spread over red, green and blue, high bits
    first (0 black, 1 dark red, 2 dark green, ..., 255 cream: the boundary colour)."""
    colours = []
    for index in range(256):
        rgb, value = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours.append((rgb[0], rgb[1], rgb[2]))
    return colours


def _code(r, g, b):
    """One integer per colour (of ints or of integer arrays): 0xRRGGBB."""
    return (r << 16) | (g << 8) | b


_BOUNDARY_CODE = _code(*voc_palette()[UNLABELLED])  # VOC's boundary colour reads as unlabelled


class BadMaskError(CorruptImageError):
    """A mask that cannot be a label of its image (a value or colour no class has, another size).
    Re-raised in the main process as one line, like `CorruptImageError`, but never skipped."""


def read_labels(root: Path) -> tuple[list[str], list[Colour] | None] | None:
    """The class names (and colours, from ``labelmap.txt``) a data root declares, or None. A labelmap
    line may leave its colour empty (``cat:::``); the colours are then None (RGB masks cannot be read)."""
    labelmap, names_file = root / "labelmap.txt", root / "classes.txt"
    if labelmap.is_file():
        names, colours = [], []
        for number, line in enumerate(labelmap.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, rest = line.partition(":")
            colour = rest.partition(":")[0].strip()
            try:
                rgb = tuple(int(v) for v in colour.split(",")) if colour else None
                if rgb is not None and (len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb)):
                    raise ValueError
            except ValueError:
                raise UserError(
                    f"{labelmap}:{number}: expected 'name:r,g,b::' (e.g. 'background:0,0,0::'), got {line!r}"
                ) from None
            names.append(name.strip())
            colours.append(rgb)
        if names:
            return names, (None if None in colours else colours)
        raise UserError(f"{labelmap}: no class lines ('name:r,g,b::')")
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if names:
            return names, None
        raise UserError(f"{names_file}: no class names (one per line)")
    return None


def read_mask(path: str, num_classes: int, colours: list[Colour] | None) -> torch.Tensor:
    """The int64 class map [H, W] of a mask file (255 -> ``IGNORE``); `BadMaskError` names a value
    that is no class."""
    with Image.open(path) as file:
        mode = file.mode
        if mode in ("RGB", "RGBA"):
            values = _indices_of_colours(np.asarray(file.convert("RGB")), path, colours)
        elif mode in ("P", "L", "1", "I", "I;16"):  # "1": a two-class mask of 0 and 1
            values = np.asarray(file).astype(np.int64)
        elif mode in ("LA", "PA"):  # the index channel; the alpha channel is not a label
            values = np.asarray(file.getchannel(0)).astype(np.int64)
        else:
            raise BadMaskError(f"mask {path}: PIL mode {mode}; expected a palette, grey or RGB PNG")
    mask = torch.from_numpy(values)
    bad = (mask >= num_classes) & (mask != UNLABELLED) | (mask < 0)
    if bad.any():
        value = int(mask[bad][0])
        raise BadMaskError(
            f"mask {path}: value {value} is not a class (0..{num_classes - 1}) nor the unlabelled value "
            f"{UNLABELLED}; fix the mask, or list the class in the data root's labelmap.txt/classes.txt"
        )
    return mask.masked_fill_(mask == UNLABELLED, IGNORE)


def _indices_of_colours(rgb: np.ndarray, path: str, colours: list[Colour] | None) -> np.ndarray:
    if colours is None:
        raise BadMaskError(
            f"mask {path} is an RGB image: its colours need the data root's labelmap.txt "
            "('name:r,g,b::' per class), or write masks of class indices"
        )
    codes = _code(*(rgb[..., channel].astype(np.int64) for channel in range(3)))
    unique, inverse = np.unique(codes, return_inverse=True)
    index_of = {_code(*colour): i for i, colour in enumerate(colours)}
    index_of.setdefault(_BOUNDARY_CODE, UNLABELLED)
    missing = [int(c) for c in unique if int(c) not in index_of]
    if missing:
        c = missing[0]
        raise BadMaskError(
            f"mask {path}: colour ({c >> 16},{(c >> 8) & 255},{c & 255}) is no class's colour in "
            "labelmap.txt; add the class or fix the mask"
        )
    return np.array([index_of[int(c)] for c in unique], dtype=np.int64)[inverse].reshape(codes.shape)


class MaskedImages(ImageFiles):
    """(image, mask) pairs of files: a uint8 ``tv_tensors.Image`` and a ``tv_tensors.Mask`` given to the
    joint ``transform`` (see ``build_segmentation_transforms``)."""

    def __init__(self, pairs: list[tuple[str, str]], classes: list[str], colours, transform, corrupt_images):
        super().__init__(pairs, classes, transform, corrupt_images)  # type: ignore[arg-type]
        self.colours = colours

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        image = self.decode(index, image_path)
        if image is None:
            return None
        try:
            mask = read_mask(mask_path, len(self.classes), self.colours)
        except BadMaskError:
            raise
        except Exception as e:  # PIL: damaged files
            mask = self.unreadable(index, mask_path, e)
            if mask is None:
                return None
        pixels = TF.pil_to_tensor(image)
        if tuple(pixels.shape[1:]) != tuple(mask.shape):
            raise BadMaskError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                f"{pixels.shape[2]}x{pixels.shape[1]} (width x height); a mask labels its image's pixels"
            )
        image, mask = tv_tensors.Image(pixels), tv_tensors.Mask(mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _with_mask(images: list[Path], mask_dir: Path, what: str) -> list[tuple[str, str]]:
    """(image, mask) paths: each image's mask is the PNG of its stem in ``mask_dir``."""
    pairs, missing = [], []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        (pairs if mask.is_file() else missing).append((str(image), str(mask)))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{what}: no mask {missing[0][1]} for {missing[0][0]}{more}; every image needs one")
    if not pairs:
        raise UserError(f"{what}: no images")
    return pairs


def _image_of(folder: Path, image_id: str, listing: Path) -> Path:
    """``folder/<id>.jpg`` (VOC's), else the id with another image extension (exports that keep the
    original files, e.g. Datumaro's)."""
    for extension in IMAGE_EXTENSIONS:  # .jpg first
        if (folder / f"{image_id}{extension}").is_file():
            return folder / f"{image_id}{extension}"
    raise UserError(f"{listing} names {image_id}, but {folder} has no {image_id}.jpg (nor .png, ...)")


class SegmentationFolders(DatasetRecord):
    """What the two file layouts share: the classes of the root, the transforms and the bundle."""

    task = "segmentation"
    has_eval_split_choice = True
    reads_files_on_demand = True
    device_pipeline = False
    default_classes: list[str] | None = None  # when the root declares none
    default_colours: list[Colour] | None = None

    @classmethod
    def pairs(cls, root: Path, spec: DataSpec) -> tuple[list, list]:
        """(train, eval) (image, mask) path pairs."""
        raise NotImplementedError

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        root = cls.root(spec)
        declared = read_labels(root)
        if declared is None and cls.default_classes is None:
            raise UserError(
                f"{root}: no labelmap.txt or classes.txt; write the class names there, one per line in "
                "index order (index 0 first), so that mask values have names"
            )
        classes, colours = declared or (cls.default_classes, cls.default_colours)
        train, evaluation = cls.pairs(root, spec)
        size = spec.input_size
        train_tf, eval_tf = build_segmentation_transforms(spec, size=size, native_size=cls.native_size)
        train, evaluation = train[: spec.train_subset], evaluation[: spec.eval_subset]

        def files(pairs: list, transform) -> MaskedImages:
            return MaskedImages(pairs, classes, colours, transform, spec.corrupt_images)

        return DataBundle(
            train=files(train, train_tf),
            eval=files(evaluation, eval_tf),
            num_classes=len(classes),
            classes=list(classes),
            in_channels=3,
            image_size=size,
            train_eval=files(train, eval_tf),
            colours=colours,
        )


@register_dataset("voc")
class VOCSegmentation(SegmentationFolders):
    summary = (
        "segmentation, Pascal VOC layout: root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png, "
        "root/ImageSets/Segmentation/train.txt and val.txt (data.eval_split names the list)"
    )
    how_to_get = (
        "point data.root at VOCdevkit/VOC2012 of VOCtrainval_11-May-2012.tar (the Pascal VOC site), or at "
        "a folder of the same layout"
    )
    default_classes = VOC_CLASSES
    default_colours = voc_palette()[: len(VOC_CLASSES)]

    @classmethod
    def pairs(cls, root: Path, spec: DataSpec) -> tuple[list, list]:
        lists = root / "ImageSets" / "Segmentation"

        def split(name: str) -> list[tuple[str, str]]:
            listing = lists / f"{name}.txt"
            if not listing.is_file():
                found = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
                raise UserError(
                    f"{listing}: no such split list (found: {', '.join(found) or 'none'}); the VOC layout "
                    "lists each split's image ids in ImageSets/Segmentation/<split>.txt"
                )
            ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            images = [_image_of(root / "JPEGImages", i, listing) for i in ids]
            return _with_mask(images, root / "SegmentationClass", str(listing))

        return split("train"), split(spec.eval_split or "val")


@register_dataset("mask_folders")
class MaskFolders(SegmentationFolders):
    summary = (
        "segmentation, image/mask folders: root/train/images/<name>.<ext> with root/train/masks/<name>.png, "
        "root/val/ (or test/) alike, class names in root/labelmap.txt or root/classes.txt"
    )

    @classmethod
    def pairs(cls, root: Path, spec: DataSpec) -> tuple[list, list]:
        def split(name: str) -> list[tuple[str, str]]:
            folder = root / name / "images"
            if not folder.is_dir():
                raise UserError(f"{folder}: not a directory; expected {root}/{name}/images/ and masks/")
            return _with_mask(list(map(Path, image_paths(folder))), root / name / "masks", str(folder))

        return split("train"), split(pick_eval_split(root, spec.eval_split))
