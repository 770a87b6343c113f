"""Detection datasets: a COCO folder (``coco_folder``), a Pascal VOC folder's boxes (``voc_boxes``) and, in
``fashion_objects.py``, the generated scenes; all read by ``detection_files`` and served by
:class:`DetectionImages`.

A sample is an image resized to the spec's ``S x S`` input, in [0, 1] (the detector's own transform
normalises it), and its target dict with boxes, masks and keypoints resized with it: a batch is one tensor
``[B, 3, S, S]`` and a list of target dicts (``DropSkipped`` keeps the dicts as a list). Each target also
says where its image came from: ``image_id`` (the file's), ``size`` (the image's own height and width) and
``scale`` (its width and height over S), so that detections are scored in the file's own pixels. Training
mirrors half the images left-right (``data.augment.hflip``): boxes, masks and keypoints with them,
keypoints named ``left...``/``right...`` swapping names (COCO's person keypoints; any set so named).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.detection_files import DetectionSet, coco_ground_truth, read_coco, read_voc_boxes
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.spec import DataSpec

DETECTION_INPUT_SIZE = 320  # the input side for files of any size unless data.image_size says


def keypoint_flips(names: list[str]) -> list[int]:
    """The keypoint order of a mirrored image: a name with ``left`` takes the place of the same name with
    ``right`` and back; others stay (``["nose", "left_eye", "right_eye"]`` -> ``[0, 2, 1]``)."""
    index = {name: i for i, name in enumerate(names)}

    def mirrored(name: str) -> str:
        return name.replace("left", "\0").replace("right", "left").replace("\0", "right")

    return [index.get(mirrored(name), i) for i, name in enumerate(names)]


class DetectionImages(Dataset):
    """The images of a :class:`DetectionSet` as samples (module docstring); ``ground_truth()`` is what
    they are scored against (the set as a COCO dict, and each class's category id)."""

    def __init__(self, data: DetectionSet, *, size: int, hflip: bool = False):
        self.data, self.size, self.hflip = data, size, hflip
        self.flips = keypoint_flips(data.keypoint_names)

    def __len__(self) -> int:
        return len(self.data.images)

    def ground_truth(self) -> tuple[dict, list[int]]:
        return coco_ground_truth(self.data), list(self.data.category_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.data.images[index]
        try:
            with Image.open(record.path) as file:
                pixels = torch.frombuffer(bytearray(file.convert("RGB").tobytes()), dtype=torch.uint8)
                width, height = file.size
        except OSError as err:
            raise UserError(f"{record.path}: not a readable image ({first_line(err)})") from None
        if (width, height) != (record.width, record.height):
            raise UserError(
                f"{record.path}: the image is {width}x{height} but its annotations say "
                f"{record.width}x{record.height}; the annotations were made for another image"
            )
        image = pixels.view(height, width, 3).permute(2, 0, 1).float() / 255
        target = self.data.target(index)
        side = self.size
        sx, sy = side / width, side / height
        image = F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True)[0].clamp(0, 1)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy])
        if "masks" in target:  # [N, 1, H, W] for interpolate: N may be 0 (an image without objects)
            masks = F.interpolate(target["masks"][:, None].float(), size=(side, side), mode="nearest")
            target["masks"] = masks[:, 0].to(torch.uint8)
        if "keypoints" in target:
            target["keypoints"] = target["keypoints"] * torch.tensor([sx, sy, 1.0])
        if self.hflip and bool(torch.rand(()) < 0.5):
            image, target = image.flip(-1), self._mirrored(target)
        target["size"] = torch.tensor([height, width])
        target["scale"] = torch.tensor([1 / sx, 1 / sy])
        del target["iscrowd"]  # training targets hold no crowd regions (detection_files)
        return image, target

    def _mirrored(self, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        side = self.size
        boxes = target["boxes"]
        target["boxes"] = torch.stack([side - boxes[:, 2], boxes[:, 1], side - boxes[:, 0], boxes[:, 3]], 1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        if "keypoints" in target:
            points = target["keypoints"][:, self.flips].clone()
            points[..., 0] = torch.where(points[..., 2] > 0, side - points[..., 0], points[..., 0])
            target["keypoints"] = points
        return target


class DetectionFolder(DatasetRecord):
    """What the detection records share: reading both splits into :class:`DetectionImages`."""

    task = "detection"
    device_pipeline = False
    has_class_choice = True
    splits: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]] = (("train",), ("val",))

    @classmethod
    def input_size(cls) -> int:
        return cls.native_size or DETECTION_INPUT_SIZE

    @classmethod
    def read_split(cls, root: Path, split: str, classes: list[str] | None) -> DetectionSet:
        raise NotImplementedError

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        root = cls.root(spec)
        classes = list(spec.classes) if spec.classes is not None else None
        train_set = cls.read_split(root, cls._split(root, 0), classes)
        eval_set = cls.read_split(root, cls._split(root, 1), train_set.classes[1:])
        if spec.train_subset is not None:
            train_set.images = train_set.images[: spec.train_subset]
        if spec.eval_subset is not None:
            eval_set.images = eval_set.images[: spec.eval_subset]
        size = spec.input_size
        hflip = spec.augment.hflip if spec.augment.hflip is not None else cls.hflip
        return DataBundle(
            train=DetectionImages(train_set, size=size, hflip=hflip),
            eval=DetectionImages(eval_set, size=size),
            num_classes=len(train_set.classes),
            classes=train_set.classes,
            in_channels=3,
            image_size=size,
            train_eval=DetectionImages(train_set, size=size),
        )

    @classmethod
    def _split(cls, root: Path, which: int) -> str:
        names = cls.splits[which]
        return next((n for n in names if cls.has_split(root, n)), names[0])

    @classmethod
    def has_split(cls, root: Path, split: str) -> bool:
        return False


@register_dataset("coco_folder")
class CocoFolder(DetectionFolder):
    summary = (
        "detection: a COCO folder (annotations/instances_<split>.json, images in <split>/; splits train "
        "and val, or train2017 and val2017) in data.root"
    )
    how_to_get = "a folder in COCO's layout (or `cmtkd-graph data prepare fashion_objects`)"
    splits = (("train", "train2017"), ("val", "val2017"))

    @classmethod
    def has_split(cls, root: Path, split: str) -> bool:
        return (root / "annotations" / f"instances_{split}.json").is_file()

    @classmethod
    def read_split(cls, root: Path, split: str, classes: list[str] | None) -> DetectionSet:
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file():
            raise UserError(f"data.root: {annotations} not found; {cls.how_to_get}")
        return read_coco(annotations, root / split, classes)


@register_dataset("voc_boxes")
class VocBoxes(DetectionFolder):
    summary = (
        "detection: the boxes of a Pascal VOC folder (Annotations/*.xml, JPEGImages/, "
        "ImageSets/Main/train.txt and val.txt) in data.root"
    )
    how_to_get = "Pascal VOC's VOCdevkit/VOC2012 (or VOC2007) folder"

    @classmethod
    def read_split(cls, root: Path, split: str, classes: list[str] | None) -> DetectionSet:
        return read_voc_boxes(root, split, classes)
