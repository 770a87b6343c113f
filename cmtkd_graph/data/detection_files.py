"""Detection data in the two formats users have: COCO JSON (boxes, polygon or RLE masks, keypoints) and
Pascal VOC XML (boxes), read into one form that torchvision's detection models take.

A sample is an image (uint8 ``[3, H, W]``) and a target dict: ``boxes`` (float ``[N, 4]``, x1 y1 x2 y2 in
pixels), ``labels`` (int64 ``[N]``, 1..C: 0 is the background, as torchvision's detectors count),
``iscrowd`` (bool ``[N]``) and, where the file has them, ``masks`` (uint8 ``[N, H, W]``; an object without
a mask in a file that has masks gets an empty one, as torchvision's reference reader gives it) and
``keypoints`` (float ``[N, K, 3]``: x, y, visibility, as the file writes them). COCO crowd regions and VOC
``difficult`` objects are read (``iscrowd``) and scored as COCOeval does (neither a hit nor a miss), but
left out of training targets unless asked for: torchvision's losses do not read ``iscrowd``, and its
reference training drops crowd annotations likewise.

The classes are the file's categories in id order (COCO) or in order of first appearance (VOC), unless
the caller names them (the spec's ``data.classes``). What stops a read with one line naming the file: an
annotation file that is not JSON or lacks ``images``/``annotations``/``categories``, a record with a
field missing or of the wrong type (naming the record), an image the annotations name that is not on
disk, a box that reaches more than one pixel outside its image (the annotations were made for another
image size), a COCO category id that the file's ``categories`` lack, a name in the spec's classes that
is not a category of the file. What is skipped and counted (one warning line per file): boxes with zero
width or height, as COCO's users expect (the released COCO files hold a few, and torchvision's and
Detectron2's readers drop them), and objects of the categories the spec's classes leave out (choosing
classes is choosing a subset, as training on COCO's people alone does). Boxes that overhang their image
by up to a pixel (rounding) are clamped to it.

:func:`coco_scores` scores detections with pycocotools' ``COCOeval`` (mAP@[.5:.95], AP50, AP75 and AP
per object size); :func:`coco_ground_truth` writes any :class:`DetectionSet` (VOC's too) as the COCO
dict it scores against.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmtkd_graph.coco import (
    COCO_METRICS,
    coco_scores,
    decode_mask,
    encode_mask,
    keypoint_sigmas,
)
from cmtkd_graph.errors import UserError, first_line

__all__ = [
    "COCO_METRICS",
    "DetectionFileWarning",
    "DetectionSet",
    "ImageRecord",
    "Instance",
    "coco_ground_truth",
    "coco_scores",
    "decode_mask",
    "encode_mask",
    "keypoint_sigmas",
    "read_coco",
    "read_voc_boxes",
]

OVERHANG = 1.0
"""How far (pixels) a box may reach outside its image and be clamped; beyond it the box is an error."""


class DetectionFileWarning(UserWarning):
    """Annotations skipped while reading a detection file (zero-area boxes), counted per file."""


@dataclass
class Instance:
    """One annotated object: its box (x1, y1, x2, y2), class index (1..C), crowd/difficult flag, its mask
    as COCO's segmentation object (polygons or RLE; None: none) and keypoints [K, 3] (None: none)."""

    box: tuple[float, float, float, float]
    label: int
    crowd: bool = False
    segmentation: Any = None
    keypoints: list[list[float]] | None = None


@dataclass
class ImageRecord:
    """One image of a detection file: its file, size, id in the file and its objects."""

    path: Path
    width: int
    height: int
    image_id: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class DetectionSet:
    """The images of one split, the class names (index 0: background), the original category id of each
    class (COCO's, for scoring; VOC's: 1..C) and the keypoint names (empty: no keypoints)."""

    images: list[ImageRecord]
    classes: list[str]
    category_ids: list[int]
    keypoint_names: list[str] = field(default_factory=list)
    skipped_boxes: int = 0
    has_masks: bool = False  # some object has a mask: every target has ``masks``

    def target(self, index: int, *, with_crowd: bool = False) -> dict[str, torch.Tensor]:
        """The target dict of image ``index`` (module docstring), masks decoded; crowd regions and
        difficult objects only ``with_crowd``."""
        record = self.images[index]
        objects = [o for o in record.instances if with_crowd or not o.crowd]
        target = {
            "boxes": torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([o.label for o in objects], dtype=torch.int64),
            "iscrowd": torch.tensor([o.crowd for o in objects], dtype=torch.bool),
            "image_id": torch.tensor(record.image_id),
        }
        if self.has_masks:
            target["masks"] = (
                torch.stack([decode_mask(o.segmentation, record.height, record.width) for o in objects])
                if objects
                else torch.zeros(0, record.height, record.width, dtype=torch.uint8)
            )
        if self.keypoint_names:
            k = len(self.keypoint_names)
            target["keypoints"] = torch.tensor(
                [o.keypoints or [[0.0, 0.0, 0.0]] * k for o in objects], dtype=torch.float32
            ).reshape(-1, k, 3)
        return target


# ---------------------------------------------------------------------------- COCO JSON
def read_coco(
    annotations: str | Path, image_root: str | Path, classes: Sequence[str] | None = None
) -> DetectionSet:
    """The images and objects of a COCO annotation file whose ``file_name``s are under ``image_root``."""
    path = Path(annotations)
    data = _json(path)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = {int(c["id"]): str(c["name"]) for c in categories}
    if classes is None:
        chosen = list(names)
    else:
        by_name = {n: i for i, n in names.items()}
        unknown = [c for c in classes if c not in by_name]
        if unknown:
            raise UserError(
                f"{path}: data.classes names {', '.join(map(repr, unknown[:3]))}, not a category of this "
                f"file (its categories: {', '.join(list(by_name)[:8])}{', ...' if len(by_name) > 8 else ''})"
            )
        chosen = [by_name[c] for c in classes]
    label_of = {cid: i + 1 for i, cid in enumerate(chosen)}
    keypoint_names = next((list(c["keypoints"]) for c in categories if c.get("keypoints")), [])

    root = Path(image_root)
    images: dict[int, ImageRecord] = {}
    missing = []
    for entry in data["images"]:
        with _record(path, "image", entry):
            file = root / str(entry["file_name"])
            images[int(entry["id"])] = ImageRecord(
                file, int(entry["width"]), int(entry["height"]), int(entry["id"])
            )
        if not file.is_file():
            missing.append(file)
    if missing:
        raise UserError(
            f"{path}: names {len(missing)} image(s) not on disk, e.g. {missing[0]}; data.root must hold the "
            f"images of its file_name fields"
        )
    skipped = []
    left_out = 0
    for a in data["annotations"]:
        with _record(path, "annotation", a):
            record = images.get(int(a["image_id"]))
            if record is None:
                raise UserError(
                    f"{path}: annotation {a.get('id')} is of image {a['image_id']}, which images lacks"
                )
            cid = int(a["category_id"])
            if cid not in names:
                known = ", ".join(str(c) for c in list(names)[:10])
                raise UserError(
                    f"{path}: annotation {a.get('id')} has category {cid}, which categories lacks "
                    f"(ids {known}{', ...' if len(names) > 10 else ''}); fix the file"
                )
            if cid not in label_of:  # a category data.classes leaves out
                left_out += 1
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            box = _inside(path, f"annotation {a.get('id')}", record, (x, y, x + w, y + h))
            if box[2] <= box[0] or box[3] <= box[1]:
                skipped.append(a.get("id"))
                continue
            keypoints = a.get("keypoints")
            if keypoints and len(keypoints) != 3 * len(keypoint_names):
                raise ValueError(
                    f"{len(keypoints)} keypoint values for {len(keypoint_names)} keypoints (x, y, v each)"
                )
            record.instances.append(
                Instance(
                    box,
                    label_of[cid],
                    bool(a.get("iscrowd", 0)),
                    a.get("segmentation") or None,
                    np.asarray(keypoints, dtype=np.float32).reshape(-1, 3).tolist() if keypoints else None,
                )
            )
    _warn_skipped(path, skipped, left_out)
    return DetectionSet(
        list(images.values()),
        ["background", *(names[c] for c in chosen)],
        chosen,
        keypoint_names,
        len(skipped),
        any(o.segmentation is not None for r in images.values() for o in r.instances),
    )


@contextlib.contextmanager
def _record(path: Path, kind: str, entry: object):
    """A missing or malformed field of one record of ``path`` as one line naming the record."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        name = entry.get("id", "?") if isinstance(entry, dict) else "?"
        what = f"no {err.args[0]!r} field" if isinstance(err, KeyError) else first_line(err)
        raise UserError(f"{path}: {kind} {name}: {what}; a COCO {kind} record needs it") from None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read the annotation file ({first_line(err)})") from None
    except ValueError as err:
        raise UserError(f"{path}: not a JSON file ({first_line(err)})") from None
    lacking = [
        k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data
    ]
    if lacking:
        raise UserError(f"{path}: no {', '.join(lacking)} list; a COCO annotation file has all three")
    return data


def _inside(
    path: Path, what: str, record: ImageRecord, box: tuple[float, ...]
) -> tuple[float, float, float, float]:
    """``box`` clamped to the image, or a UserError where it overhangs by more than OVERHANG."""
    x1, y1, x2, y2 = box
    if min(x1, y1) < -OVERHANG or x2 > record.width + OVERHANG or y2 > record.height + OVERHANG:
        raise UserError(
            f"{path}: {what}'s box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) reaches outside its image "
            f"{record.path.name} ({record.width}x{record.height}); were the boxes made for another size?"
        )
    return (max(x1, 0.0), max(y1, 0.0), min(x2, float(record.width)), min(y2, float(record.height)))


def _warn_skipped(path: Path, skipped: list, left_out: int = 0) -> None:
    if skipped:
        ids = ", ".join(str(i) for i in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"{path}: {len(skipped)} box(es) of zero width or height skipped (annotations {ids})",
            DetectionFileWarning,
            stacklevel=3,
        )
    if left_out:
        warnings.warn(
            f"{path}: {left_out} object(s) of categories data.classes leaves out skipped",
            DetectionFileWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------- Pascal VOC XML
def read_voc_boxes(root: str | Path, split: str, classes: Sequence[str] | None = None) -> DetectionSet:
    """The boxes of a Pascal VOC folder's ``ImageSets/Main/<split>.txt`` images (``Annotations/*.xml``,
    ``JPEGImages/``). VOC's pixel coordinates start at 1: a box covering pixels xmin..xmax becomes
    (xmin - 1, ymin - 1, xmax, ymax). ``difficult`` objects are kept with ``iscrowd`` set."""
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"{listing}: missing; a VOC detection folder lists each split's images there")
    found: list[str] = list(classes or [])
    images = []
    skipped = []
    left_out = 0
    for image_id, name in enumerate(listing.read_text().split()):
        xml = root / "Annotations" / f"{name}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as err:
            raise UserError(f"{xml}: not a readable VOC annotation ({first_line(err)})") from None
        size = tree.find("size")
        if size is None:
            raise UserError(f"{xml}: no <size>; a VOC annotation gives the image's width and height")
        file = root / "JPEGImages" / (tree.findtext("filename") or f"{name}.jpg")
        if not file.is_file():
            raise UserError(f"{xml}: its image {file} is not on disk")
        width, height = (round(_number(xml, size, key)) for key in ("width", "height"))
        record = ImageRecord(file, width, height, image_id)
        for index, obj in enumerate(tree.iter("object")):
            name_of = (obj.findtext("name") or "").strip()
            if name_of not in found:
                if classes is not None:  # a class data.classes leaves out
                    left_out += 1
                    continue
                found.append(name_of)
            bnd = obj.find("bndbox")
            if bnd is None:
                raise UserError(f"{xml}: object {index} ({name_of}) has no <bndbox>")
            x1, y1, x2, y2 = (_number(xml, bnd, k) for k in ("xmin", "ymin", "xmax", "ymax"))
            box = _inside(xml, f"object {index} ({name_of})", record, (x1 - 1, y1 - 1, x2, y2))
            if box[2] <= box[0] or box[3] <= box[1]:
                skipped.append(f"{name}#{index}")
                continue
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            record.instances.append(Instance(box, found.index(name_of) + 1, difficult))
        images.append(record)
    _warn_skipped(listing, skipped, left_out)
    return DetectionSet(images, ["background", *found], list(range(1, len(found) + 1)), [], len(skipped))


def _number(xml: Path, element: ET.Element, key: str) -> float:
    """The number in ``<key>`` under ``element`` of a VOC file, or a UserError naming it."""
    text = element.findtext(key)
    try:
        return float(text)
    except (TypeError, ValueError):
        found = "missing" if text is None else repr(text)
        raise UserError(f"{xml}: <{element.tag}><{key}> is {found}, not a number") from None


# ---------------------------------------------------------------------------- COCO scoring
def coco_ground_truth(data: DetectionSet) -> dict:
    """``data`` as a COCO annotation dict (ids as in ``data``; VOC's difficult objects as crowd regions,
    on which a detection is neither a hit nor a miss: close to VOC's rule, not the same, docs/tasks.md)."""
    annotations = []
    for record in data.images:
        for o in record.instances:
            x1, y1, x2, y2 = o.box
            a = {
                "id": len(annotations) + 1,
                "image_id": record.image_id,
                "category_id": data.category_ids[o.label - 1],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": _area(o, record),
                "iscrowd": int(o.crowd),
            }
            if o.segmentation is not None:
                a["segmentation"] = o.segmentation
            elif data.has_masks:  # a box-only object in a file with masks: an empty mask, as in training
                a["segmentation"] = encode_mask(torch.zeros(record.height, record.width, dtype=torch.bool))
            if (
                o.keypoints is not None or data.keypoint_names
            ):  # none: no keypoint visible (COCOeval skips it)
                points = o.keypoints or [[0.0, 0.0, 0.0]] * len(data.keypoint_names)
                a["keypoints"] = [v for point in points for v in point]
                a["num_keypoints"] = sum(1 for point in points if point[2] > 0)
            annotations.append(a)
    return {
        "images": [
            {"id": r.image_id, "width": r.width, "height": r.height, "file_name": r.path.name}
            for r in data.images
        ],
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, **({"keypoints": data.keypoint_names} if data.keypoint_names else {})}
            for cid, name in zip(data.category_ids, data.classes[1:], strict=True)
        ],
    }


def _area(o: Instance, record: ImageRecord) -> float:
    """The object's area as COCO counts it for the size ranges: the mask's where it has one."""
    if o.segmentation is not None:
        return float(decode_mask(o.segmentation, record.height, record.width).sum())
    x1, y1, x2, y2 = o.box
    return (x2 - x1) * (y2 - y1)
