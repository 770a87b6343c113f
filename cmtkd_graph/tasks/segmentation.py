"""``task: segmentation`` — one class per pixel; the model returns ``{"out": logits [B, classes, H, W]}``.

The builders of ``torchvision.models.segmentation``: ``fcn_resnet50/101``, ``deeplabv3_resnet50/101``,
``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large`` (docs/architecture.md#tasks).

Every pixel is a sample of the objective: the logits [B, C, H, W] become [B*H*W, C] and the masks
[B, H, W] become [B*H*W] before a method's terms see them, so cross-entropy, KDCL-MinLogit, the KL
terms and the combined teacher apply per pixel unchanged. A pixel labelled ``IGNORE`` (the datasets'
255) counts in no cross-entropy; the distillation terms, which need no label, use every pixel.
With ``aux_loss: true`` in a network's kwargs (FCN, DeepLabV3), its auxiliary head's per-pixel
cross-entropy joins the objective at half the weight of the main one, as in torchvision's reference
training; the head is not part of the deployed student.
Metrics: mean IoU over the classes that occur (in the labels or the predictions), pixel accuracy and
each class's IoU (``iou/<network>``, a list; None for a class that occurs nowhere), from a confusion
matrix summed over the evaluation images.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from cmtkd_graph.tasks.base import Task, register_task


@register_task("segmentation")
class Segmentation(Task):
    summary = (
        "one class per pixel: logits [B, classes, H, W], per-pixel cross-entropy, mIoU and pixel accuracy"
    )
    builder_modules = ("torchvision.models.segmentation",)
    main_output = "out"
    labels_may_ignore = True  # the datasets' 255: object boundaries, unlabelled regions
    # torchvision's default fetches ImageNet backbone weights; the spec's weights: decides instead
    builder_defaults: ClassVar[dict[str, Any]] = {"weights_backbone": None}
    metric_titles: ClassVar[dict[str, str]] = {"miou": "mIoU %", "pixacc": "pixel acc. %"}
    # aux_loss=True: an FCN head on an earlier backbone stage, trained with half the weight of the main
    # prediction's cross-entropy (torchvision's references/segmentation/train.py), never deployed
    aux_output = "aux"
    aux_head = "aux_classifier"
    aux_weight = 0.5
    aux_builders = ("fcn_", "deeplabv3_")  # the builders that have the head (LR-ASPP has none)

    @classmethod
    def kwargs_problem(cls, arch: str, kwargs: dict[str, Any]) -> str | None:
        if kwargs.get("aux_loss") and not arch.startswith(cls.aux_builders):
            return (
                f"aux_loss: {arch} has no auxiliary head (torchvision builds one for "
                f"{', '.join(b + '*' for b in cls.aux_builders)}); drop it"
            )
        return None

    @classmethod
    def label_shape(cls, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape[1:])  # a class per pixel

    @staticmethod
    def sample_logits(logits: Tensor) -> Tensor:
        return logits.movedim(1, -1).reshape(-1, logits.shape[1])

    @staticmethod
    def sample_labels(labels: Tensor) -> Tensor:
        return labels.reshape(-1)

    @classmethod
    def predictions(cls, logits: Tensor, classes: list[str], top: int) -> list[list[dict]]:
        """Per image, the ``top`` classes covering most pixels: ``{"class", "index", "share"}`` (of its
        pixels) and ``"probability"`` (the mean probability of the class on those pixels)."""
        confidence, predicted = torch.softmax(logits.float(), dim=1).max(1)
        answers = []
        for conf, pred in zip(confidence.flatten(1), predicted.flatten(1), strict=True):
            pixels = torch.bincount(pred, minlength=logits.shape[1])
            mean = torch.zeros(logits.shape[1]).index_add_(0, pred, conf) / pixels.clamp_min(1)
            order = pixels.argsort(descending=True)[: min(top, int((pixels > 0).sum()))]
            answers.append(
                [
                    {
                        "class": classes[c] if classes else str(c),
                        "index": c,
                        "share": int(pixels[c]) / len(pred),
                        "probability": float(mean[c]),
                    }
                    for c in order.tolist()
                ]
            )
        return answers

    @classmethod
    def masks(cls, logits: Tensor) -> Tensor | None:
        return logits.argmax(1).to(torch.uint8)

    @classmethod
    def metric_rows(cls, logits: Tensor, labels: Tensor) -> Tensor:
        """Each image's confusion matrix (true class x predicted class), flattened: [B, C*C]."""
        classes = logits.shape[1]
        predicted = logits.argmax(1).flatten(1)
        truth = labels.flatten(1)
        counted = (truth >= 0) & (truth < classes)  # IGNORE, and a label the model has no class for
        index = torch.where(counted, truth * classes + predicted, classes * classes)  # ignored: one bin more
        offsets = torch.arange(len(index), device=index.device)[:, None] * (classes * classes + 1)
        bins = torch.bincount((index + offsets).flatten(), minlength=len(index) * (classes * classes + 1))
        return bins.view(len(index), classes * classes + 1)[:, :-1].float()  # an empty batch: [0, C*C]

    @classmethod
    def metric_values(cls, state: Tensor) -> dict[str, float | list[float | None]]:
        classes = math.isqrt(len(state))
        confusion = state.double().view(classes, classes)
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits
        present = union > 0
        iou = hits / union.clamp_min(1)
        miou = iou[present].mean() if present.any() else torch.tensor(0.0)
        pixacc = hits.sum() / confusion.sum().clamp_min(1)
        per_class = [100 * float(v) if p else None for v, p in zip(iou, present, strict=True)]
        return {"miou": 100 * float(miou), "pixacc": 100 * float(pixacc), "iou": per_class}
