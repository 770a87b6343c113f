"""``task: detection`` — the objects of an image: boxes and classes (masks, keypoints where models have them).

The builders of ``torchvision.models.detection``: Faster R-CNN (ResNet-50 FPN v1/v2, MobileNetV3 FPN and
its 320-px version), Mask R-CNN (v1/v2), Keypoint R-CNN, RetinaNet (v1/v2), FCOS, SSD300-VGG16 and
SSDlite320-MobileNetV3. A sample is an image ``[3, S, S]`` in [0, 1] (the detector's own transform
normalises it) and torchvision's target dict: ``boxes`` (x1, y1, x2, y2 in pixels of the S x S input),
``labels`` (1..C; 0 is the background: a network's ``num_classes`` counts it), and ``masks``/``keypoints``
where the data has them; ``image_id`` and ``size`` (the original height and width) say where the image
came from, so that its detections are scored in the file's own coordinates.

The networks are rewritten part by part (``cmtkd_graph.models.parts``) and trained by their own losses
(torchvision's, as its models return them in training mode) with the CMT-KD terms of
``cmtkd_graph.detection_system`` (docs/tasks.md#detection). Metrics: COCO's, by pycocotools' COCOeval on
the detections of every evaluated image: mAP@[.5:.95] (the one a run is judged by), AP50, AP75 and AP
per object size, for boxes, and for masks and keypoints where the network predicts them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from cmtkd_graph.tasks.base import Task, register_task

KEYPOINTS_DEFAULT = 17  # keypointrcnn_resnet50_fpn's num_keypoints unless its kwargs set it (COCO's)
IOU_TYPES = (("", "bbox", "bbox"), ("mask_", "segm", "segmentation"), ("kp_", "keypoints", "keypoints"))
"""What COCOeval scores: metric prefix, COCOeval's iouType, the result's key."""


@register_task("detection")
class Detection(Task):
    summary = (
        "object detection: images [B, 3, S, S] -> boxes, classes and scores (masks, keypoints), the "
        "detectors' own losses, COCO mAP by pycocotools"
    )
    builder_modules = ("torchvision.models.detection",)
    # nothing downloaded: the backbones start from the spec's weights or from scratch
    builder_defaults: ClassVar[dict[str, Any]] = {"weights_backbone": None}
    sample_noun = "image"
    collects_objects = True
    system_builder = "cmtkd_graph.detection_system:build_detection_system"
    predictor = "cmtkd_graph.deploy.predict_objects:predict_objects"
    onnx_tracer = "torchscript"
    onnx_answers = "detections"
    tap_part = "backbone"
    metric_titles: ClassVar[dict[str, str]] = {"map": "mAP %", "ap50": "AP50 %", "ap75": "AP75 %"}
    methods = ("cmtkd", "single")
    methods_reason = "the detection objective is written for CMT-KD and the student alone: docs/tasks.md"

    @classmethod
    def objective(cls, spec: Any) -> str | None:
        d = spec.distill
        if spec.method == "single":
            return f"{d.alpha:g} DET_S [the detector's own losses]"
        text = f"{d.alpha:g} (DET_T + DET_S) [each network's own detection losses]"
        if d.mutual_learning:
            text += (
                f" + {d.beta:g} (KL_T + KL_S) [KDCL-MinLogit, tau {d.tau:g}, on the class outputs the "
                f"networks share: per anchor, per proposal of the student{_roi_outputs(spec.student.arch)}]"
            )
        if d.feature_loss != "none":
            text += f" + {d.gamma:g} {d.feature_loss} loss at the backbones' taps"
        return text + f"; combined teacher: {d.combine} fusion of the teachers' class outputs"

    @classmethod
    def spec_problems(cls, spec: Any) -> list[str]:
        problems = []
        student = spec.student
        for k, teacher in enumerate(spec.resolved_teachers()):
            if teacher.arch != student.arch or cls.builder_kwargs(teacher.kwargs) != cls.builder_kwargs(
                student.kwargs
            ):
                problems.append(
                    f"teachers[{k}]: {teacher.arch} {teacher.kwargs or {}} differs from the student's "
                    f"{student.arch} {student.kwargs or {}}; detection teachers are the student's network at "
                    "other bits (their anchors and proposals line up), so drop the teacher's arch and kwargs"
                )
        problems += cls.part_by_part_problems(spec)
        return problems

    @classmethod
    def example_labels(
        cls,
        batch: int,
        classes: int,
        input_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        spec: Any = None,
    ) -> list[dict[str, Tensor]]:
        """One object of class 1 per image over the middle of the image: its box, its mask (what Mask
        R-CNN trains on; the other detectors leave the mask) and, for a Keypoint R-CNN of ``spec``, as
        many visible keypoints as it predicts, spread over the box."""
        side = input_shape[-1]
        box = torch.tensor([[side / 4, side / 4, 3 * side / 4, 3 * side / 4]], device=device)
        mask = torch.zeros(1, side, side, dtype=torch.uint8, device=device)
        mask[:, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
        one = {"boxes": box, "labels": torch.ones(1, dtype=torch.long, device=device), "masks": mask}
        if spec is not None and spec.student.arch.startswith("keypointrcnn"):
            count = spec.student.kwargs.get("num_keypoints", KEYPOINTS_DEFAULT)
            along = torch.linspace(side / 4, 3 * side / 4, count, device=device)
            one["keypoints"] = torch.stack([along, along.flip(0), torch.full_like(along, 2.0)], dim=1)[None]
        return [dict(one) for _ in range(batch)]

    @classmethod
    def predictions(cls, logits: Tensor, classes: list[str], top: int) -> list[list[dict]]:
        raise NotImplementedError("detections are boxes (docs/tasks.md#detection)")

    @classmethod
    def metric_rows(cls, logits: Any, labels: Any) -> list[dict]:
        """Per image, ``{"image_id", "results"}``: its detections (torchvision's dicts, in ``logits``) in
        COCO's result form (:func:`detection_results`)."""
        return [
            {"image_id": int(target["image_id"]), "results": detection_results(found, target)}
            for found, target in zip(logits, labels, strict=True)
        ]

    @classmethod
    def score_objects(cls, rows: list[dict], dataset: Any) -> tuple[dict[str, float], list[dict]]:
        """COCO's metrics of every evaluated image's detections (``rows``) against ``dataset``'s ground
        truth (``dataset.ground_truth()``: the COCO dict and each class's category id), on those images
        only, and the detections as COCO results with the file's category ids (what ``eval`` writes):
        boxes (``map``, ``ap50``, ...), masks (``mask_map``, ...) and keypoints (``kp_map``, ...) where
        the network predicts them. Mask scores read the masks alone (no box: COCOeval would take the
        box's area for the mask's size, Detectron2's reason for the same choice)."""
        from cmtkd_graph.coco import COCO_METRICS, coco_scores

        truth, category_ids = dataset.ground_truth()
        evaluated = {row["image_id"] for row in rows}
        truth = {
            **truth,
            "images": [i for i in truth["images"] if i["id"] in evaluated],
            "annotations": [a for a in truth["annotations"] if a["image_id"] in evaluated],
        }
        results = [
            {"image_id": row["image_id"], "category_id": category_ids[r["label"] - 1], **r}
            for row in rows
            for r in row["results"]
        ]
        for r in results:
            del r["label"]
        values: dict[str, float] = {}
        for prefix, iou_type, key in IOU_TYPES:
            if prefix and not any(key in r for r in results[:1]):
                continue
            only = [{k: r[k] for k in ("image_id", "category_id", key, "score")} for r in results]
            scores = coco_scores(truth, only, iou_type)
            values.update({prefix + k: scores[k] for k in COCO_METRICS})
        return values, results


def _roi_outputs(arch: str) -> str:
    """The outputs of an R-CNN's mask or keypoint branch that mutual learning reads, for the objective."""
    if arch.startswith("maskrcnn"):
        return "; the mask logits per pixel of its positive proposals"
    if arch.startswith("keypointrcnn"):
        return "; the keypoint heatmaps per keypoint of its positive proposals"
    return ""


def detection_results(found: dict[str, Tensor], target: dict[str, Tensor]) -> list[dict]:
    """One image's detections (torchvision's ``boxes``, ``labels``, ``scores``, ``masks`` [N, 1, S, S]
    probabilities, ``keypoints`` [N, K, 3]) as COCO results in the image's own pixels: the input was the
    image resized by ``target["scale"]`` (its width and height over the input's), so boxes and keypoints
    are scaled back and masks resized to ``target["size"]`` and cut at 0.5 (torchvision's threshold)."""
    import torch.nn.functional as F

    from cmtkd_graph.coco import encode_mask

    sx, sy = (float(v) for v in target["scale"])
    # RetinaNet and FCOS may answer class 0, the background column of their sigmoids: not a detection
    found = {k: v[found["labels"] > 0] for k, v in found.items()}
    boxes = found["boxes"].detach().float().cpu() * torch.tensor([sx, sy, sx, sy])
    results = [
        {"label": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        for (x1, y1, x2, y2), c, s in zip(
            boxes.tolist(), found["labels"].tolist(), found["scores"].tolist(), strict=True
        )
    ]
    if "masks" in found and results:
        height, width = (int(v) for v in target["size"])
        masks = F.interpolate(found["masks"].detach().float().cpu(), size=(height, width), mode="bilinear")
        for r, mask in zip(results, masks[:, 0] > 0.5, strict=True):
            r["segmentation"] = encode_mask(mask)
    if "keypoints" in found and results:
        points = found["keypoints"].detach().float().cpu() * torch.tensor([sx, sy, 1.0])
        for r, p in zip(results, points.tolist(), strict=True):
            r["keypoints"] = [v for point in p for v in point]
    return results
