"""``task: video`` — one class per clip; the model maps a clip [B, 3, T, H, W] to class logits
[B, classes].

The builders of ``torchvision.models.video``: ``r3d_18``, ``mc3_18``, ``r2plus1d_18`` (3-D ResNets),
``s3d``, ``mvit_v1_b``, ``mvit_v2_s`` (multiscale vision transformers) and ``swin3d_t/s/b`` (Video Swin).
A clip is one sample, as an image is in classification: cross-entropy, the methods' terms and the
combined teacher apply to clip logits unchanged; the tap features are 5-D ([B, C, T, H, W]) and the
attention maps of feature distillation spread over time and space (docs/tasks.md#video-classification).
Metrics: clip top-1 and top-5 accuracy.
"""

from __future__ import annotations

from cmtkd_graph.tasks.base import Task, register_task


@register_task("video")
class Video(Task):
    summary = "one class per clip: clips [B, 3, T, H, W] -> class logits [B, classes], clip top-1/top-5"
    builder_modules = ("torchvision.models.video",)
    clips = True
    sample_noun = "clip"
