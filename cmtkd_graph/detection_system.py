"""``build_detection_system(spec)``: CMT-KD for object detection, students and teachers in one module.

A detector does not trace whole, so each network is rewritten part by part (``cmtkd_graph.models.parts``:
backbone, RPN head, RoI box/mask/keypoint heads and predictors, or the dense head of RetinaNet, FCOS and
SSD, through the same passes as any network), and torchvision's own code still runs its transform,
anchors, box coding, proposal sampling, RoI alignment, losses and post-processing.
:class:`DetectorNetwork` holds one detector's modules under torchvision's names (its state dict is
torchvision's) and runs what the model's ``forward`` runs after its backbone, with the backbone's maps
given, so that they may come from elsewhere:

* the teachers' **backbones are composed** into one graph (``passes.compose``, ``combine=None``): at every
  tap an importance-weighted fusion forms the shared knowledge, which feeds every teacher's later backbone
  layers (FPN included) and is distilled into the student's tap (attention or FitNet), as in
  classification; every teacher detects from its own composed maps;
* **the class outputs the networks share** are fused into the combined teacher (importance-weighted, one
  fusion per output) and learn with the student by KDCL-MinLogit: teachers are the student's network at
  other bits, so their anchors line up: per anchor, RetinaNet's and FCOS's per-class sigmoids (as two-class
  logits, ``losses.binary_as_two_class``), SSD's softmax, and the RPN's objectness; per proposal, the
  box classifier's logits, every teacher's box head run on **the student's sampled proposals**, so that
  they line up (Chen et al., NeurIPS 2017, distil a teacher's soft labels into a student's RPN and
  classifier); in evaluation the combined teacher detects with the same fusions (box deltas weighted
  alike, :meth:`DetectionSystem._combined_detections`);
* each network's task loss is torchvision's own (DET): the student's, and every training teacher's from
  its own proposals (a teacher is a detector by itself: it is evaluated and deployed alone).

Objective: alpha (DET_S + DET_T) + beta (KL_S + KL_T) + gamma feature terms (docs/tasks.md#detection);
``method: single`` trains the student alone with its own losses.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torchvision.models.detection.roi_heads import (
    keypointrcnn_inference,
    keypoints_to_heatmap,
    maskrcnn_inference,
    project_masks_on_boxes,
)
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from cmtkd_graph import losses
from cmtkd_graph.models.parts import build_part_network
from cmtkd_graph.passes.common import EACH_LOGITS, FEATURES, LOGITS, SHARED
from cmtkd_graph.passes.compose import OUTPUT_FUSION
from cmtkd_graph.passes.shapes import propagate_shapes
from cmtkd_graph.spec import ModelSpec, Spec
from cmtkd_graph.system import (
    NetworkInfo,
    SystemBase,
    check_rules_used,
    compose_part_teachers,
    warn_rules_on_float_teachers,
)
from cmtkd_graph.system_output import SystemOutput
from cmtkd_graph.tasks import IGNORE

log = logging.getLogger("cmtkd_graph")

OBJECTNESS = "objectness"
"""The fusion of the RPN's objectness (R-CNN); ``OUTPUT_FUSION`` fuses the class outputs."""
MASKS = "masks"  # Mask R-CNN's mask logits, per pixel of each positive proposal (a sigmoid)
KEYPOINTS = "keypoints"  # Keypoint R-CNN's heatmaps: per keypoint of each positive proposal, a softmax
ROI_BRANCHES = {MASKS: "mask", KEYPOINTS: "keypoint"}  # shared output -> the RoI heads' branch
SIGMOID_KINDS = ("retinanet", "fcos")  # per-class sigmoid outputs; R-CNN's and SSD's classes are a softmax


def detector_kind(model: nn.Module) -> str:
    """``rcnn`` (Faster, Mask, Keypoint R-CNN), ``retinanet``, ``fcos`` or ``ssd``."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    for kind, cls in (("rcnn", GeneralizedRCNN), ("retinanet", RetinaNet), ("fcos", FCOS), ("ssd", SSD)):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"{type(model).__name__} is not a torchvision detector")


def fixed_input_size(model: nn.Module, side: int, kwargs: dict) -> None:
    """Make the detector's own resize keep ``side x side`` inputs (the data already resized them) unless the
    spec's kwargs set ``min_size``/``max_size``; SSD's transform has its own fixed size (300 or 320)."""
    transform = model.transform
    if getattr(transform, "fixed_size", None) is None and not {"min_size", "max_size"} & set(kwargs):
        transform.min_size, transform.max_size = (side,), side


@dataclass
class Shared:
    """The class outputs one network computes where the others' line up (module docstring), each
    ``[N, classes]`` (``[N]`` for sigmoid objectness), with their labels ``[N]`` (:data:`IGNORE`: not
    counted): ``{"objectness": ..., "classes": ...}``. ``proposals``: the sampled proposals of R-CNN's
    box classifier (the student's are every network's)."""

    logits: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    proposals: list[Tensor] | None = None
    # the positive proposals the mask and keypoint branches ran on, per image, and their classes
    positives: list[Tensor] | None = None
    positive_classes: Tensor | None = None


class DetectorNetwork(nn.Module):
    """One torchvision detector as a network of the tool: its modules under torchvision's names (the state
    dict is torchvision's, plus quantizer state), with the backbone's maps given to :meth:`detect` and
    :meth:`losses`. ``forward(images)`` answers ``{LOGITS: detections, FEATURES: tap features}`` (what
    evaluation asks of a student); ``detector`` is the torchvision model whose methods (box coding,
    matching, losses, post-processing) run on these same modules."""

    def __init__(self, detector: nn.Module, classes: int):
        super().__init__()
        for name, child in detector.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "detector", detector)  # not a submodule: its modules are this one's
        self.kind = detector_kind(detector)
        self.classes = classes  # read before the rewrite: a traced head no longer says
        self.heads = {head for head in ("mask", "keypoint") if _has_head(detector, head)}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, classes={self.classes}"

    def check_targets(self, targets: list[dict]) -> None:
        """One line where the data lacks what this detector trains on (Mask R-CNN's masks, Keypoint
        R-CNN's keypoints, as many as it predicts)."""
        from cmtkd_graph.errors import UserError

        first = targets[0] if targets else {}
        if "mask" in self.heads and "masks" not in first:
            raise UserError("data: Mask R-CNN trains on object masks, and this dataset has none (boxes only)")
        if "keypoint" in self.heads:
            wanted = self.roi_heads.keypoint_predictor.kps_score_lowres.out_channels
            have = first["keypoints"].shape[1] if "keypoints" in first else 0
            if have != wanted:
                fix = f"set student.kwargs.num_keypoints: {have}" if have else "this dataset has none"
                raise UserError(
                    f"data: Keypoint R-CNN predicts {wanted} keypoints and the objects have {have}; {fix}"
                )

    def prepare(self, images: Tensor, targets: list[dict] | None = None):
        """torchvision's transform of a batch ``[B, 3, S, S]`` in [0, 1]: an ImageList and the targets."""
        return self.transform(list(images.unbind(0)), targets)

    def encode(self, tensors: Tensor) -> tuple[OrderedDict, dict[str, Tensor]]:
        """The backbone's feature maps (by level) and tap features of a transformed batch."""
        out = self.backbone(tensors)
        return out[LOGITS], dict(out[FEATURES])

    def forward(self, images: Tensor) -> dict:
        image_list, _ = self.prepare(images)
        maps, features = self.encode(image_list.tensors)
        return {LOGITS: self.detect(image_list, maps, input_sizes(images)), FEATURES: features}

    # ------------------------------------------------------------------ inference
    def detect(self, image_list, maps: OrderedDict, sizes: list[tuple[int, int]]) -> list[dict]:
        """The detections of a transformed batch from its maps (torchvision's inference, in eval mode),
        in the pixels of the images given to :meth:`prepare` (their ``sizes``)."""
        if self.kind == "rcnn":
            proposals, _ = self.rpn(image_list, maps)
            found, _ = self.roi_heads(maps, proposals, image_list.image_sizes)
            return self.transform.postprocess(found, image_list.image_sizes, sizes)
        levels = list(maps.values())
        return self.dense_detections(image_list, levels, self.head(levels), sizes)

    def dense_detections(
        self, image_list, levels: list[Tensor], head_outputs: dict[str, Tensor], sizes: list[tuple[int, int]]
    ) -> list[dict]:
        """A dense detector's (RetinaNet, FCOS, SSD) detections from its head's outputs on ``levels``:
        its anchors, box decoding and NMS, as torchvision's inference runs them."""
        anchors = self.anchor_generator(image_list, levels)
        if self.kind == "ssd":
            found = self.detector.postprocess_detections(head_outputs, anchors, image_list.image_sizes)
        else:
            per_level = [x.size(2) * x.size(3) for x in levels]
            if self.kind == "retinanet":  # its anchors per location: A
                per_level = [hw * (head_outputs["cls_logits"].size(1) // sum(per_level)) for hw in per_level]
            split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
            split_anchors = [list(a.split(per_level)) for a in anchors]
            found = self.detector.postprocess_detections(split, split_anchors, image_list.image_sizes)
        return self.transform.postprocess(found, image_list.image_sizes, sizes)

    def proposals(self, image_list, levels: list[Tensor], objectness: list[Tensor], deltas: list[Tensor]):
        """An R-CNN's proposals from its RPN head's outputs (objectness and box deltas per level): anchors,
        decoding, top-k, NMS, as torchvision's RPN runs them after its head (in eval mode)."""
        anchors = self.rpn.anchor_generator(image_list, levels)
        per_level = [o[0].numel() for o in objectness]  # A x H x W of each level
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = self.rpn.box_coder.decode(flat_deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.rpn.filter_proposals(decoded, flat_objectness, image_list.image_sizes, per_level)
        return boxes

    # ------------------------------------------------------------------ training
    def losses(self, image_list, maps: OrderedDict, targets: list[dict]) -> tuple[dict[str, Tensor], Shared]:
        """torchvision's training losses of a transformed batch from its maps, and the class outputs the
        networks share (:class:`Shared`)."""
        self.check_targets(targets)
        if self.kind == "rcnn":
            return self._rcnn_losses(image_list, maps, targets)
        levels = list(maps.values())
        head_outputs = self.head(levels)
        anchors = self.anchor_generator(image_list, levels)
        matched = self.matches(anchors, targets, [x.size(2) * x.size(3) for x in levels])
        if self.kind == "ssd":
            found = self.detector.compute_loss(targets, head_outputs, anchors, matched)
        else:
            found = self.head.compute_loss(targets, head_outputs, anchors, matched)
        labels = anchor_labels(matched, targets).flatten()
        return found, Shared({"classes": head_outputs["cls_logits"].flatten(0, 1)}, {"classes": labels})

    def matches(self, anchors: list[Tensor], targets: list[dict], per_level: list[int]) -> list[Tensor]:
        """Each anchor's object (index into the image's boxes; -1 background, -2 between thresholds), as
        the model's ``compute_loss`` matches them (RetinaNet, SSD: the IoU matcher; FCOS: centre sampling)."""
        matched = []
        for anchors_i, target in zip(anchors, targets, strict=True):
            boxes = target["boxes"]
            if boxes.numel() == 0:
                matched.append(
                    torch.full((anchors_i.size(0),), -1, dtype=torch.int64, device=anchors_i.device)
                )
            elif self.kind == "fcos":
                matched.append(fcos_matches(self.detector, anchors_i, boxes, per_level))
            else:
                matched.append(self.detector.proposal_matcher(box_ops.box_iou(boxes, anchors_i)))
        return matched

    def _rcnn_losses(self, image_list, maps: OrderedDict, targets: list[dict]) -> tuple[dict, Shared]:
        seen: dict = {}  # what the RPN head computed, the proposals RoIHeads sampled, their class logits

        def output(key: str):
            return lambda module, args, out: seen.update({key: out}) and None

        def rois(module, args) -> None:
            seen["rois"] = args[1]

        def positives(module, args) -> None:
            seen["positives"] = args[1]

        heads = self.roi_heads
        hooks = [
            self.rpn.head.register_forward_hook(output("rpn")),
            heads.box_roi_pool.register_forward_pre_hook(rois),
            heads.box_predictor.register_forward_hook(output("box")),
        ]
        for name, branch in ROI_BRANCHES.items():
            if branch in self.heads:
                hooks.append(getattr(heads, f"{branch}_roi_pool").register_forward_pre_hook(positives))
                hooks.append(getattr(heads, f"{branch}_predictor").register_forward_hook(output(name)))
        try:
            proposals, rpn_losses = self.rpn(image_list, maps, targets)
            _, roi_losses = self.roi_heads(maps, proposals, image_list.image_sizes, targets)
        finally:
            for hook in hooks:
                hook.remove()
        shared = Shared(proposals=list(seen["rois"]))
        shared.logits[OBJECTNESS] = concat_box_prediction_layers(*seen["rpn"])[0].flatten()
        anchors = self.rpn.anchor_generator(image_list, list(maps.values()))
        anchor_marks, _ = self.rpn.assign_targets_to_anchors(anchors, targets)
        objectness = torch.cat(anchor_marks).long()  # 1 object, 0 background, -1 between: not counted
        shared.labels[OBJECTNESS] = torch.where(objectness < 0, IGNORE, objectness)
        shared.logits["classes"] = seen["box"][0]
        shared.labels["classes"] = torch.cat(proposal_labels(self.roi_heads, shared.proposals, targets))
        if "positives" in seen:
            shared.positives = list(seen["positives"])
            matched, classes = positive_objects(self.roi_heads, shared.proposals, targets)
            shared.positive_classes = torch.cat(classes)
            for name in ROI_BRANCHES:
                if name in seen:
                    labels = roi_labels(name, seen[name], shared.positives, matched, targets)
                    shared.logits[name] = roi_samples(name, seen[name], shared.positive_classes)
                    shared.labels[name] = labels
        return {**rpn_losses, **roi_losses}, shared

    def head_outputs(self, maps: OrderedDict) -> object:
        """What every head computes from the maps alone: the dense head's outputs, or the RPN head's and
        the RoI heads' on regions of their pooled size (one region per map location of the first level:
        the shapes of training, not its proposals)."""
        levels = list(maps.values())
        if self.kind != "rcnn":
            return self.head(levels)
        heads = self.roi_heads
        outputs = [self.rpn.head(levels)]
        regions = levels[0].shape[0] * 8
        for pool, head, predictor in (
            ("box_roi_pool", "box_head", "box_predictor"),
            ("mask_roi_pool", "mask_head", "mask_predictor"),
            ("keypoint_roi_pool", "keypoint_head", "keypoint_predictor"),
        ):
            if getattr(heads, pool, None) is None:
                continue
            side = getattr(heads, pool).output_size
            side = side if isinstance(side, int) else side[0]
            pooled = levels[0].new_zeros(regions, levels[0].shape[1], side, side)
            outputs.append(getattr(heads, predictor)(getattr(heads, head)(pooled)))
        return outputs

    def shared_outputs(
        self, image_list, maps: OrderedDict, student: Shared, own: Shared | None = None
    ) -> dict[str, Tensor]:
        """This network's class outputs where ``student``'s are (its objectness over every anchor, its box
        classifier on the student's proposals, or its dense class outputs). ``own``: what this network's
        :meth:`losses` of the same step computed, whose per-anchor outputs are these (anchors line up),
        so its heads do not run on the maps again; only the box classifier runs, on the student's
        proposals."""
        levels = list(maps.values())
        if self.kind != "rcnn":
            return {
                "classes": own.logits["classes"] if own else self.head(levels)["cls_logits"].flatten(0, 1)
            }
        objectness = (
            own.logits[OBJECTNESS] if own else concat_box_prediction_layers(*self.rpn.head(levels))[0]
        )
        heads = self.roi_heads
        pooled = heads.box_roi_pool(maps, student.proposals, image_list.image_sizes)
        with _frozen_statistics(heads.box_head):  # its own losses' step updated them
            classes, _ = heads.box_predictor(heads.box_head(pooled))
        shared = {OBJECTNESS: objectness.flatten(), "classes": classes}
        for name, branch in ROI_BRANCHES.items():  # its mask / keypoint head on the student's positives
            if name in student.logits:
                out = self.branch_logits(branch, maps, student.positives, image_list.image_sizes)
                shared[name] = roi_samples(name, out, student.positive_classes)
        return shared

    def branch_logits(self, branch: str, maps: OrderedDict, boxes: list[Tensor], image_sizes) -> Tensor:
        """The ``branch`` ("mask" or "keypoint") RoI head's logits on ``boxes``: its RoI pooling, head and
        predictor, the head's normalisation on its running statistics (in training, its own losses' step
        updated them)."""
        heads = self.roi_heads
        pooled = getattr(heads, f"{branch}_roi_pool")(maps, boxes, image_sizes)
        head = getattr(heads, f"{branch}_head")
        with _frozen_statistics(head):
            return getattr(heads, f"{branch}_predictor")(head(pooled))


@contextlib.contextmanager
def _frozen_statistics(module: nn.Module):
    """Run ``module``'s normalisation layers on their running statistics, without updating them (a box
    head with BatchNorm, run a second time in one step on other regions)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _has_head(detector: nn.Module, head: str) -> bool:
    """Whether an R-CNN has its ``mask`` or ``keypoint`` branch."""
    return getattr(getattr(detector, "roi_heads", None), f"{head}_predictor", None) is not None


def _total(value) -> Tensor:
    """The sum of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(value, Tensor):
        return value.sum()
    items = value.values() if isinstance(value, dict) else value
    return sum((_total(v) for v in items), torch.zeros((), device=_device_of(value)))


def _device_of(value) -> torch.device:
    while not isinstance(value, Tensor):
        value = next(iter(value.values() if isinstance(value, dict) else value))
    return value.device


def decisions(name: str, logits: Tensor, labels: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """A shared class output as the samples mutual learning reads, ``([N, classes], [N])``, without the
    ones labelled :data:`IGNORE`: softmax classes as they are; a sigmoid output (objectness, RetinaNet's and
    FCOS's per-class outputs) as one binary decision per anchor (and class), two-class logits
    (``losses.binary_as_two_class``) whose label is 1 where the anchor's object is of that class."""
    kept = labels != IGNORE
    if name in (OBJECTNESS, MASKS):
        return losses.binary_as_two_class(logits[kept]), labels[kept]
    if kind in SIGMOID_KINDS:  # a background anchor (label 0) is 0 for every class, as the focal loss has it
        chosen = logits[kept]
        one_hot = torch.nn.functional.one_hot(labels[kept], chosen.shape[-1])
        one_hot[:, 0] = 0
        return losses.binary_as_two_class(chosen.flatten()), one_hot.flatten()
    return logits[kept], labels[kept]


def input_sizes(images: Tensor) -> list[tuple[int, int]]:
    """(height, width) of every image of a batch, what torchvision's post-processing scales back to."""
    return [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]


def proposal_labels(roi_heads: nn.Module, proposals: list[Tensor], targets: list[dict]) -> list[Tensor]:
    """The class of each sampled proposal (0: background), as RoIHeads assigned it when it sampled them
    (the assignment is a pure function of the proposals and the objects)."""
    _, labels = roi_heads.assign_targets_to_proposals(
        proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets]
    )
    return labels


def positive_objects(
    roi_heads: nn.Module, proposals: list[Tensor], targets: list[dict]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per image, the object and the class of each positive sampled proposal (class > 0): what RoIHeads'
    mask and keypoint branches train on, in their order."""
    matched, labels = roi_heads.assign_targets_to_proposals(
        proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets]
    )
    return [m[c > 0] for m, c in zip(matched, labels, strict=True)], [c[c > 0] for c in labels]


def roi_samples(name: str, logits: Tensor, classes: Tensor) -> Tensor:
    """A mask or keypoint branch's outputs on the positive proposals as the samples mutual learning
    reads: the mask logits of each proposal's class, one per pixel ``[P * M * M]`` (a sigmoid); the
    keypoint heatmaps, one softmax over the M x M positions per proposal and keypoint ``[P * K, M * M]``."""
    if name == MASKS:
        return logits[torch.arange(classes.numel(), device=logits.device), classes].flatten()
    return logits.flatten(2).flatten(0, 1)


def roi_labels(
    name: str, logits: Tensor, positives: list[Tensor], matched: list[Tensor], targets: list[dict]
) -> Tensor:
    """The true label of each of :func:`roi_samples`' samples, as torchvision's losses read the objects:
    a pixel is 1 inside the object's mask (its ``project_masks_on_boxes`` target, cut at 0.5); a
    keypoint's label is its heatmap position (``keypoints_to_heatmap``), :data:`IGNORE` where it is not
    visible or falls outside the proposal."""
    side = logits.shape[-1]
    rows = []
    for boxes, objects, target in zip(positives, matched, targets, strict=True):
        if name == MASKS:
            rows.append(
                (project_masks_on_boxes(target["masks"], boxes, objects, side) >= 0.5).long().flatten()
            )
        else:
            heatmaps, valid = keypoints_to_heatmap(target["keypoints"][objects], boxes, side)
            rows.append(torch.where(valid > 0, heatmaps, IGNORE).flatten())
    return torch.cat(rows) if rows else logits.new_zeros(0, dtype=torch.long)


def anchor_labels(matched: list[Tensor], targets: list[dict]) -> Tensor:
    """``[B, anchors]``: the class of each anchor's object, 0 for background, :data:`IGNORE` between the
    matcher's thresholds."""
    rows = []
    for m, target in zip(matched, targets, strict=True):
        classes = target["labels"][m.clamp_min(0)] if target["labels"].numel() else torch.zeros_like(m)
        rows.append(torch.where(m >= 0, classes, torch.where(m == -1, 0, IGNORE)))
    return torch.stack(rows)


def fcos_matches(fcos: nn.Module, anchors: Tensor, boxes: Tensor, per_level: list[int]) -> Tensor:
    """FCOS's assignment of locations to objects (``FCOS.compute_loss``, Tian et al. 2019): a location
    matches an object whose box contains it, within ``center_sampling_radius`` strides of its centre, and
    whose size falls in the location's level's range; among several, the smallest object; else -1."""
    gt_centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2] - anchors[:, 0]
    match = (centers[:, None, :] - gt_centers[None]).abs_().max(dim=2).values < (
        fcos.center_sampling_radius * sizes[:, None]
    )
    x, y = centers.unsqueeze(dim=2).unbind(dim=1)
    x0, y0, x1, y1 = boxes.unsqueeze(dim=0).unbind(dim=2)
    distances = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
    match &= distances.min(dim=2).values > 0
    lower, upper = sizes * 4, sizes * 8
    lower[: per_level[0]] = 0
    upper[-per_level[-1] :] = float("inf")
    reach = distances.max(dim=2).values
    match &= (reach > lower[:, None]) & (reach < upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best, index = (match.to(torch.float32) * (1e8 - areas[None, :])).max(dim=1)
    index[best < 1e-5] = -1
    return index


class DetectionSystem(SystemBase):
    """The student and the teachers of a detection spec, trained by one objective (module docstring).

    Answers as :class:`~cmtkd_graph.system.DistillationSystem` does where the trainer and the evaluation
    ask: ``system(images, targets)`` -> (:class:`SystemOutput`, loss terms) in training;
    ``system(images)`` -> detections as ``student_logits`` and ``each_teacher_logits`` (lists of
    torchvision's dicts, one per image). ``teachers`` holds ``teacher{k}`` and ``fusion``."""

    def __init__(
        self,
        spec: Spec,
        student: DetectorNetwork,
        teachers: fx.GraphModule | None,
        teacher_networks: list[DetectorNetwork],
        adapters: nn.ModuleDict,
        networks: list[NetworkInfo],
    ):
        super().__init__(spec)
        self.student = student
        self.teachers = teachers
        object.__setattr__(self, "teacher_networks", teacher_networks)  # their modules are in teachers
        if (
            student.kind == "rcnn"
        ):  # the box classifier's class logits, the RPN's objectness, masks, keypoints
            self.output_parts = {OUTPUT_FUSION: "roi_heads.box_predictor", OBJECTNESS: "rpn.head"}
            self.output_parts.update(
                {
                    name: f"roi_heads.{branch}_predictor"
                    for name, branch in ROI_BRANCHES.items()
                    if branch in student.heads
                }
            )
        else:  # the dense head's class outputs
            self.output_parts = {OUTPUT_FUSION: "head"}
        self.adapters = adapters
        self.method_modules = nn.ModuleDict()
        self.networks = networks
        self._freeze()

    runs_on_meta = False  # torchvision's box logic between the layers needs values (see layers_forward)

    def num_classes(self) -> int | None:
        return self.student.classes

    def forward(
        self, images: Tensor, targets: list[dict] | None = None
    ) -> SystemOutput | tuple[SystemOutput, dict[str, Tensor]]:
        student = self.student
        image_list, prepared = student.prepare(images, targets)
        maps, features = student.encode(image_list.tensors)
        each_maps, shared = self._teacher_maps(image_list.tensors)
        if targets is None:  # detections
            sizes = input_sizes(images)
            found = [
                t.detect(image_list, m, sizes) for t, m in zip(self.teacher_networks, each_maps, strict=True)
            ]
            return SystemOutput(
                student_logits=student.detect(image_list, maps, sizes),
                teacher_logits=self._combined_detections(image_list, each_maps, sizes),
                each_teacher_logits=tuple(found),
            )
        d = self.spec.distill
        found, mine = student.losses(image_list, maps, prepared)
        terms = {f"det_student/{k}": v for k, v in found.items()}
        terms["det_student"] = torch.stack(list(found.values())).sum()
        total = d.alpha * terms["det_student"]
        out = SystemOutput(student_logits=mine.logits["classes"], student_features=features)
        if self.teachers is not None:
            each = self._teacher_outputs(image_list, each_maps, prepared, mine, terms)
            if "det_teacher" in terms:
                total = total + d.alpha * terms["det_teacher"]
            out.shared_features, out.hints = shared, dict(shared)
            if d.mutual_learning:
                total = total + d.beta * self._mutual_terms(mine, each, terms)
        terms["total"] = self.method.add_feature_terms(self.method_context, out, terms, total)
        return out, terms

    def layers_forward(self, tensors: Tensor) -> Tensor:
        """Every network's layers on a transformed batch, summed to one number: the backbones (the
        teachers' composed) and each head on the maps, R-CNN's RoI heads on pooled regions of their size.
        What the meta device can run (shapes, not values: the box logic between the layers is
        torchvision's eager code, which needs values); ``docs/models.md`` builds and runs it backward."""
        maps, _ = self.student.encode(tensors)
        each_maps, _ = self._teacher_maps(tensors)
        total = tensors.new_zeros(())
        for network, levels in zip([self.student, *self.teacher_networks], [maps, *each_maps], strict=True):
            total = total + sum(_total(v) for v in levels.values()) + _total(network.head_outputs(levels))
        return total

    def _combined_detections(self, image_list, each_maps: list[OrderedDict], sizes) -> list[dict] | None:
        """The combined teacher's detections, where the teachers' outputs are fused (mutual learning):
        every teacher's head outputs on its own maps fused by the fusion of their class outputs (its
        learned importance, or the mean), box deltas with the same weights (networks of one architecture
        share their anchors and box coding), decoded by teacher 0's box logic. An R-CNN's RPN outputs fuse
        by the objectness fusion into one set of proposals, on which every teacher's box head runs; on the
        detections, every teacher's mask or keypoint branch runs and their logits fuse by that branch's
        fusion (:func:`_combined_branch`). None: no fusion, no combined teacher."""
        fusion = self.teachers.get_submodule("fusion") if self.teachers is not None else None
        if fusion is None or not hasattr(fusion, OUTPUT_FUSION):
            return None
        fuse = fusion.get_submodule(OUTPUT_FUSION)
        teachers = self.teacher_networks
        each_levels = [list(maps.values()) for maps in each_maps]
        first = teachers[0]
        if first.kind != "rcnn":
            outputs = [t.head(levels) for t, levels in zip(teachers, each_levels, strict=True)]
            fused = {key: fuse(*(out[key] for out in outputs)) for key in outputs[0]}
            return first.dense_detections(image_list, each_levels[0], fused, sizes)
        rpn = [t.rpn.head(levels) for t, levels in zip(teachers, each_levels, strict=True)]
        by_objectness = fusion.get_submodule(OBJECTNESS)
        objectness, deltas = (
            [by_objectness(*(out[i][level] for out in rpn)) for level in range(len(each_levels[0]))]
            for i in (0, 1)
        )
        proposals = first.proposals(image_list, each_levels[0], objectness, deltas)
        classes, boxes = [], []
        for teacher, maps in zip(teachers, each_maps, strict=True):
            heads = teacher.roi_heads
            pooled = heads.box_roi_pool(maps, proposals, image_list.image_sizes)
            c, b = heads.box_predictor(heads.box_head(pooled))
            classes.append(c)
            boxes.append(b)
        found = first.roi_heads.postprocess_detections(
            fuse(*classes), fuse(*boxes), proposals, image_list.image_sizes
        )
        results = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(*found, strict=True)]
        for name, branch in ROI_BRANCHES.items():
            if branch in first.heads and hasattr(fusion, name):
                _combined_branch(results, branch, fusion.get_submodule(name), teachers, each_maps, image_list)
        return first.transform.postprocess(results, image_list.image_sizes, sizes)

    def _teacher_maps(self, tensors: Tensor) -> tuple[list[OrderedDict], dict[str, Tensor]]:
        """Every teacher's backbone maps, and the shared knowledge at the taps (none without teachers)."""
        if self.teachers is None:
            return [], {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.teacher_trains):
            composed = self.teachers(tensors)
        return list(composed[EACH_LOGITS]), dict(composed[SHARED])

    def _teacher_outputs(self, image_list, each_maps, targets, mine: Shared, terms: dict) -> list[dict]:
        """Every teacher's shared class outputs (on the student's proposals and anchors); a training
        teacher's own losses go into ``terms`` (``det_teacher``: their sum)."""
        each, own = [], []
        for k, (teacher, maps) in enumerate(zip(self.teacher_networks, each_maps, strict=True)):
            trains = k not in self.frozen_teachers
            with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
                its_own = None
                if trains:
                    found, its_own = teacher.losses(image_list, maps, targets)
                    terms.update({f"det_teacher{k}/{name}": v for name, v in found.items()})
                    own.append(torch.stack(list(found.values())).sum())
                if self.spec.distill.mutual_learning:
                    each.append(teacher.shared_outputs(image_list, maps, mine, its_own))
        if own:
            terms["det_teacher"] = torch.stack(own).sum()
        return each

    def _mutual_terms(self, mine: Shared, each: list[dict], terms: dict) -> Tensor:
        """KDCL-MinLogit between the student and the combined teacher on every shared output; adds
        ``kl_student``, ``kl_teacher`` (and per output) to ``terms``; returns their sum."""
        fusion = self.teachers.get_submodule("fusion")
        tau = self.spec.distill.tau
        kind = self.student.kind
        student_sum, teacher_sum = [], []
        for name, logits in mine.logits.items():
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.teacher_trains):
                combined = fusion.get_submodule(FUSION_OF[name])(*(outputs[name] for outputs in each))
            s, labels = decisions(name, logits, mine.labels[name], kind)
            t, _ = decisions(name, combined, mine.labels[name], kind)
            if labels.numel():
                z = losses.kdcl_min_logit(t, s, labels)
                terms[f"kl_student/{name}"] = losses.soft_kl(z, s, tau)
                terms[f"kl_teacher/{name}"] = losses.soft_kl(z, t, tau)
            else:  # no sample this step (no positive proposal for the masks): every process logs the same
                # terms, and the fusion stays in the graph with a zero gradient (DDP waits for every one)
                terms[f"kl_student/{name}"] = s.sum() * 0
                terms[f"kl_teacher/{name}"] = t.sum() * 0
            student_sum.append(terms[f"kl_student/{name}"])
            teacher_sum.append(terms[f"kl_teacher/{name}"])
        zero = mine.logits["classes"].new_zeros(())
        terms["kl_student"] = torch.stack(student_sum).sum() if student_sum else zero
        terms["kl_teacher"] = torch.stack(teacher_sum).sum() if teacher_sum else zero
        return terms["kl_student"] + terms["kl_teacher"]


def _combined_branch(
    results: list[dict], branch: str, fuse: nn.Module, teachers: list, each_maps: list, image_list
) -> None:
    """The combined teacher's masks or keypoints, added to its ``results``: every teacher's ``branch``
    (mask or keypoint RoI pooling, head and predictor) on the combined detections' boxes, the logits fused
    by ``fuse`` (the fusion mutual learning trains on these logits), read as torchvision's R-CNNs read
    their own (``maskrcnn_inference``: each box's class channel; ``keypointrcnn_inference``)."""
    boxes = [r["boxes"] for r in results]
    fused = fuse(
        *(
            teacher.branch_logits(branch, maps, boxes, image_list.image_sizes)
            for teacher, maps in zip(teachers, each_maps, strict=True)
        )
    )
    if branch == "mask":
        probabilities = maskrcnn_inference(fused, [r["labels"] for r in results])
        for result, p in zip(results, probabilities, strict=True):
            result["masks"] = p
        return
    points, scores = keypointrcnn_inference(fused, boxes)
    for result, p, s in zip(results, points, scores, strict=True):
        result["keypoints"], result["keypoints_scores"] = p, s


FUSION_OF = {"classes": OUTPUT_FUSION, OBJECTNESS: OBJECTNESS, MASKS: MASKS, KEYPOINTS: KEYPOINTS}
"""The fusion module (under the composed teachers' ``fusion``) of each shared class output."""


def detector_classes(detector: nn.Module) -> int:
    """How many classes a detector tells apart, the background included (its ``num_classes``)."""
    kind = detector_kind(detector)
    if kind == "rcnn":
        predictor = detector.roi_heads.box_predictor
        return predictor.get_submodule("cls_score").out_features
    if kind == "ssd":
        return detector.head.classification_head.num_columns
    return detector.head.classification_head.num_classes


def build_detection_system(
    spec: Spec, *, device: str | torch.device = "cpu", load: bool = True
) -> DetectionSystem:
    """Build the detection system of ``spec`` (module docstring). ``device="meta"`` builds the structure
    without allocating weights; ``load=False`` skips every network's ``weights:``."""
    side = spec.data.input_shape()[-1]
    networks: list[NetworkInfo] = []

    def make(model: ModelSpec, label: str, network: str) -> DetectorNetwork:
        classes: list[int] = []

        def prepare(detector: nn.Module) -> None:
            fixed_input_size(detector, side, model.kwargs or {})
            classes.append(detector_classes(detector))  # read before the rewrite: a traced head does not say

        detector = build_part_network(
            model,
            spec,
            label=label,
            network=network,
            networks=networks,
            device=device,
            load=load,
            prepare=prepare,
        )
        propagate_shapes(detector.backbone, (2, 3, *backbone_input(detector, side)))
        return DetectorNetwork(detector, classes[0])

    student = make(spec.student, "student", "student")
    teacher_specs = spec.resolved_teachers()
    teachers = [make(t, f"teacher{k}", "teacher") for k, t in enumerate(teacher_specs)]
    check_rules_used(spec, [student, *teachers])
    warn_rules_on_float_teachers(spec, teachers, teacher_specs)

    rests = [{name: child for name, child in t.named_children() if name != "backbone"} for t in teachers]
    fusions = (OUTPUT_FUSION, OBJECTNESS) if student.kind == "rcnn" else (OUTPUT_FUSION,)
    fusions += tuple(name for name, branch in ROI_BRANCHES.items() if branch in student.heads)
    fusions = fusions if spec.distill.mutual_learning else ()  # no unused parameters under DDP
    parts = compose_part_teachers(
        spec,
        student.backbone,
        [t.backbone for t in teachers],
        rests,
        networks,
        fusions=fusions,
        device=device,
    )
    for network in teachers:
        network.backbone = None  # its layers live in the composed graph
    return DetectionSystem(spec, student, parts.teachers, teachers, parts.adapters, networks)


def backbone_input(detector: nn.Module, side: int) -> tuple[int, int]:
    """The (height, width) the backbone sees for ``side x side`` images: SSD's fixed size, else ``side``
    (the transform keeps it; ``fixed_input_size``)."""
    fixed = getattr(detector.transform, "fixed_size", None)
    return tuple(fixed) if fixed is not None else (side, side)
