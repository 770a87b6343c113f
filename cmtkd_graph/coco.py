"""COCO's formats and scores, with pycocotools: masks as RLE, and COCOeval's metrics.

Shared by the detection files' reader (``cmtkd_graph.data.detection_files``), the generated scenes and the
detection task's scoring (``cmtkd_graph.tasks.detection``); a leaf module (it imports nothing of the tool
but its errors).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import numpy as np
import torch

from cmtkd_graph.errors import UserError


def coco_mask_module():
    """pycocotools' mask module, or a UserError naming the install command."""
    try:
        from pycocotools import mask
    except ImportError:
        raise UserError(
            "COCO masks and scores need pycocotools, which is not installed: "
            "`pip install 'cmtkd-graph[detection]'`"
        ) from None
    return mask


def decode_mask(segmentation: Any, height: int, width: int) -> torch.Tensor:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as uint8 ``[H, W]`` (1: object)."""
    if segmentation is None:  # an object without a mask in a file with masks
        return torch.zeros(height, width, dtype=torch.uint8)
    coco_mask = coco_mask_module()
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools' compiled decoder predates numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.from_numpy(coco_mask.decode(rle).astype(np.uint8))


def encode_mask(mask: torch.Tensor) -> dict:
    """A binary mask ``[H, W]`` as COCO's compressed RLE (``counts`` as a string: JSON-writable)."""
    coco_mask = coco_mask_module()
    rle = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


COCO_METRICS = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
"""The first six numbers of ``COCOeval.stats``, in %, under these names."""


COCO_KEYPOINT_SIGMAS = (
    .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89,
)  # fmt: skip
"""COCO's per-keypoint falloff of the object keypoint similarity, times 10 (pycocotools' default for its
17 person keypoints)."""


def keypoint_sigmas(count: int) -> list[float]:
    """The OKS falloff per keypoint: COCO's for its 17 person keypoints, else their mean (0.072) for every
    keypoint (a set of other keypoints has no published constants; the mean treats them alike)."""
    coco = [v / 10 for v in COCO_KEYPOINT_SIGMAS]
    return coco if count == len(coco) else [sum(coco) / len(coco)] * count


def coco_scores(ground_truth: dict, detections: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """pycocotools' COCOeval of ``detections`` (COCO's result format: ``image_id``, ``category_id``,
    ``bbox`` [x, y, w, h] or ``segmentation`` or ``keypoints``, ``score``) against ``ground_truth``, as
    ``{"map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}`` in % (keypoints: no small size;
    -1 where COCOeval has nothing to score; :func:`keypoint_sigmas` for the similarity). No detections
    score 0."""
    coco_mask_module()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return dict.fromkeys(COCO_METRICS, 0.0)
    known = {image["id"] for image in ground_truth["images"]}
    strangers = sorted({d["image_id"] for d in detections} - known)
    if strangers:
        raise ValueError(f"detections of images the ground truth does not have: {strangers[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print their progress
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        found = truth.loadRes(detections)
        evaluation = COCOeval(truth, found, iou_type)
        if iou_type == "keypoints":
            names = next((c.get("keypoints") for c in ground_truth["categories"] if c.get("keypoints")), [])
            evaluation.params.kpt_oks_sigmas = np.array(keypoint_sigmas(len(names)))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(v) for v in evaluation.stats]
    if iou_type == "keypoints":  # stats: AP, AP50, AP75, AP medium, AP large, AR ...
        stats = [*stats[:3], -1.0, *stats[3:5]]
    return {k: (100.0 * v if v >= 0 else -1.0) for k, v in zip(COCO_METRICS, stats, strict=False)}
