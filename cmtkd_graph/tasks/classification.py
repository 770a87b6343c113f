"""``task: classification`` — one label per image; the model returns class logits [B, classes].

The builders of ``torchvision.models`` itself (``list_models(module=torchvision.models)``): ResNets,
MobileNets, EfficientNets, RegNets, ConvNeXts, ViTs, Swins and the rest (docs/architecture.md).
"""

from __future__ import annotations

from cmtkd_graph.tasks.base import Task, register_task


@register_task("classification")
class Classification(Task):
    summary = "one class per image: class logits [B, classes], cross-entropy, top-1/top-5 accuracy"
    builder_modules = ("torchvision.models",)
