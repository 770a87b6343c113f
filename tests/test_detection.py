"""``task: detection``: the spec's checks, the detection datasets, a detector network against torchvision's
own forward (losses and detections), the composed system against an eager implementation of the same
objective (values and gradients), every builder composed with two teachers, and the quickstart trained by
the CLI in two processes, resumed, evaluated, its COCO mAP equal to pycocotools' on the written file."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torchvision
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph import losses
from cmtkd_graph.data import build_datasets, build_loaders
from cmtkd_graph.data.detection_files import DetectionFileWarning, read_coco
from cmtkd_graph.data.detections import DetectionImages, keypoint_flips
from cmtkd_graph.detection_system import build_detection_system
from cmtkd_graph.errors import UserError
from cmtkd_graph.inspection import support
from cmtkd_graph.quantizers import FULL_PRECISION
from cmtkd_graph.registry import TASKS
from cmtkd_graph.spec.io import validate_spec
from cmtkd_graph.tasks import IGNORE

from .conftest import REPO, cli, train_tiny_example

SIZE = 128
QUICK = "fasterrcnn_mobilenet_v3_large_320_fpn"
SAMPLING = {"box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 100}
DETECTORS = torchvision.models.list_models(module=torchvision.models.detection)
TAPS = ("backbone.extra.0.0.2", "backbone.extra.1.0.2")  # two ReLU6 modules of SSDlite's extra layers


def det_spec(arch: str = QUICK, teachers: int | list = 2, bits: int = 2, **extra) -> cg.Spec:
    kwargs = {"num_classes": 3, **(SAMPLING if arch.startswith(("faster", "mask", "keypoint")) else {})}
    if arch.startswith("keypoint"):
        kwargs["num_keypoints"] = 4
    data = {"dataset": "fashion_objects", "root": "unused", "batch_size": 2, **extra.pop("data", {})}
    return validate_spec(
        {
            "name": "det",
            "student": {"arch": arch, "kwargs": kwargs, "weight_bits": bits, "act_bits": bits},
            "teachers": teachers
            if isinstance(teachers, list)
            else [{"weight_bits": 4, "act_bits": 4}, {"weight_bits": 8, "act_bits": 8}][:teachers],
            "data": data,
            **extra,
        }
    )


def _targets(batch: int = 2) -> list[dict]:
    """Two objects an image (classes 1 and 2), masks and keypoints inside their boxes."""
    targets = []
    for i in range(batch):
        boxes = torch.tensor([[10.0 + i, 12.0, 60.0, 70.0], [64.0, 50.0 + i, 120.0, 110.0]])
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
        masks[0, 12:70, 10:60] = masks[1, 50:110, 64:120] = 1
        points = torch.tensor(
            [[[30.0, 12.0, 2.0], [59.0, 40.0, 2.0], [30.0, 69.0, 2.0], [10.0, 40.0, 2.0]]] * 2
        )
        points[1, :, :2] += 54.0
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "keypoints": points})
    return targets


# ---------------------------------------------------------------- the spec
def test_the_detection_task_covers_the_12_builders_and_infers_from_them():
    assert TASKS.get("detection").model_names() == tuple(DETECTORS) and len(DETECTORS) == 12
    spec = det_spec()
    assert spec.resolved_task == "detection"
    assert "DET_T + DET_S" in TASKS.get("detection").objective(spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"teachers": [{"arch": "ssdlite320_mobilenet_v3_large", "weight_bits": 4, "act_bits": 4}]},
            "teachers[0]: ssdlite",
        ),
        ({"data": {"augment": {"crop": "random"}}}, "data.augment.crop"),
        ({"distill": {"label_smoothing": 0.1}}, "distill.label_smoothing"),
        ({"method": "kd"}, "method"),
    ],
)
def test_a_detection_spec_the_task_cannot_run_is_one_line(change, message):
    with pytest.raises((UserError, ValueError)) as err:
        det_spec(**change)
    assert message in str(err.value)


def test_data_classes_choose_the_categories_and_only_for_detection(fashion_objects):
    """Choosing classes is choosing a subset: the other categories' objects are left out and counted."""
    with pytest.warns(DetectionFileWarning, match="of categories data.classes leaves out skipped"):
        bundle = build_datasets(
            det_spec(data={"root": str(fashion_objects), "classes": ["Bag", "Trouser"]}).data
        )
    assert bundle.classes == ["background", "Bag", "Trouser"] and bundle.num_classes == 3
    labels = {int(c) for i in range(len(bundle.train)) for c in bundle.train.data.target(i)["labels"]}
    assert labels == {1, 2}
    empty = next(i for i in range(len(bundle.train)) if not len(bundle.train.data.target(i)["labels"]))
    _, target = bundle.train[empty]  # an image none of whose objects is chosen: empty targets
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 128, 128)
    with pytest.raises(UserError, match=r"data\.classes: only for coco_folder/fashion_objects/voc_boxes"):
        validate_spec(
            {
                "name": "c",
                "student": {"arch": "resnet18", "weight_bits": 2, "act_bits": 2},
                "data": {"dataset": "cifar10", "classes": ["cat"]},
            }
        )


# ---------------------------------------------------------------- the data
def test_keypoint_flips_swap_left_and_right_names():
    assert keypoint_flips(["nose", "left_eye", "right_eye"]) == [0, 2, 1]
    assert keypoint_flips(["top", "right", "bottom", "left"]) == [0, 3, 2, 1]


def test_images_are_resized_and_mirrored_with_their_boxes_masks_and_keypoints(fashion_objects):
    data = read_coco(fashion_objects / "annotations" / "instances_train.json", fashion_objects / "train")
    plain = DetectionImages(data, size=64)
    image, target = plain[0]
    original = data.target(0)
    assert image.shape == (3, 64, 64) and float(image.min()) >= 0 and float(image.max()) <= 1
    torch.testing.assert_close(target["boxes"], original["boxes"] / 2)
    assert target["masks"].shape[-2:] == (64, 64) and target["size"].tolist() == [128, 128]
    assert target["scale"].tolist() == [2.0, 2.0] and int(target["image_id"]) == data.images[0].image_id
    flipped = DetectionImages(data, size=64, hflip=True)
    torch.manual_seed(0)
    mirrored = next(
        t for _, t in (flipped[0] for _ in range(20)) if not torch.equal(t["boxes"], target["boxes"])
    )
    boxes = target["boxes"]
    torch.testing.assert_close(mirrored["boxes"][:, 0], 64 - boxes[:, 2])
    assert torch.equal(mirrored["masks"], target["masks"].flip(-1))
    # "right" (index 1) and "left" (index 3) change places, their x mirrored
    torch.testing.assert_close(mirrored["keypoints"][:, 1, 0], 64 - target["keypoints"][:, 3, 0])


def test_an_image_of_another_size_than_its_annotations_is_one_line(tmp_path, fashion_objects):
    import shutil

    from PIL import Image

    root = tmp_path / "coco"
    shutil.copytree(fashion_objects, root)
    first = sorted((root / "train").iterdir())[0]
    Image.new("RGB", (100, 90)).save(first)
    data = read_coco(root / "annotations" / "instances_train.json", root / "train")
    with pytest.raises(UserError, match="the image is 100x90 but its annotations say 128x128"):
        DetectionImages(data, size=128)[0]


def test_the_loaders_batch_images_and_keep_targets_as_a_list(fashion_objects):
    spec = det_spec(data={"root": str(fashion_objects), "num_workers": 0})
    bundle = build_datasets(spec.data)
    train, _ = build_loaders(bundle, spec.data, train_batch_size=2, eval_batch_size=2, seed=0)
    images, targets = next(iter(train))
    assert images.shape == (2, 3, SIZE, SIZE) and isinstance(targets, list) and len(targets) == 2
    assert {"boxes", "labels", "masks", "keypoints", "image_id", "size", "scale"} <= set(targets[0])


def test_sigmoid_decisions_leave_the_background_column_off_and_label_0_is_no_detection():
    """Mutual learning's binary decisions per anchor and class: a background anchor is 0 for every class
    (the focal loss's target), an ignored anchor counts nowhere; a detection of class 0 (RetinaNet's and
    FCOS's sigmoids have that column) is not scored."""
    from cmtkd_graph.detection_system import decisions
    from cmtkd_graph.tasks.detection import detection_results

    logits = torch.arange(9.0).view(3, 3)
    pairs, labels = decisions("classes", logits, torch.tensor([0, 2, IGNORE]), "retinanet")
    assert labels.tolist() == [0, 0, 0, 0, 0, 1] and pairs[:, 1].tolist() == [0, 1, 2, 3, 4, 5]
    found = {
        "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 8.0]]),
        "labels": torch.tensor([0, 2]),
        "scores": torch.tensor([0.9, 0.8]),
    }
    target = {"scale": torch.tensor([2.0, 0.5]), "size": torch.tensor([4, 12])}
    assert detection_results(found, target) == [
        {"label": 2, "bbox": [4.0, 1.0, 8.0, 3.0], "score": pytest.approx(0.8)}
    ]


def test_data_without_what_the_detector_trains_on_is_one_line():
    system = build_detection_system(det_spec("maskrcnn_resnet50_fpn", teachers=0, method="single"))
    system.train()
    boxes_only = [{k: v for k, v in t.items() if k in ("boxes", "labels")} for t in _targets(1)]
    with pytest.raises(UserError, match="Mask R-CNN trains on object masks, and this dataset has none"):
        system(torch.rand(1, 3, SIZE, SIZE), boxes_only)


# ---------------------------------------------------------------- the networks
def _float_detector(arch: str) -> nn.Module:
    spec = det_spec(arch, teachers=0, bits=FULL_PRECISION, method="single")
    return build_detection_system(spec).student


@pytest.mark.parametrize(
    "arch", [QUICK, "maskrcnn_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large"]
)
def test_a_detector_network_computes_what_torchvision_computes(arch):
    """A float network of the tool (rewritten parts, torchvision's modules) and a torchvision model with its
    weights: the same training losses (the same random proposal sampling) and the same detections."""
    torch.manual_seed(0)
    network = _float_detector(arch)
    reference = torchvision.models.get_model(
        arch, weights=None, weights_backbone=None, **det_spec(arch).student.kwargs
    )
    if network.kind != "ssd":
        reference.transform.min_size, reference.transform.max_size = (SIZE,), SIZE
    state = {k: v for k, v in network.state_dict().items()}
    reference.load_state_dict(state)
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = _targets()
    network.train(), reference.train()
    torch.manual_seed(1)  # the transform draws its size, the samplers their anchors and proposals
    image_list, prepared = network.prepare(images, [dict(t) for t in targets])
    maps, _ = network.encode(image_list.tensors)
    ours, shared = network.losses(image_list, maps, prepared)
    torch.manual_seed(1)
    theirs = reference(list(images), [dict(t) for t in targets])
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    shared_outputs = (
        {"objectness", "classes", "masks"} if arch.startswith("mask") else {"objectness", "classes"}
    )
    assert set(shared.logits) == (shared_outputs if network.kind == "rcnn" else {"classes"})
    network.eval(), reference.eval()
    with torch.no_grad():
        found = network(images)["logits"]
        expected = reference(list(images))
    for a, b in zip(found, expected, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], msg=key)


# ---------------------------------------------------------------- the system
def test_the_composed_detection_system_equals_an_eager_objective_in_values_and_gradients():
    """SSDlite: a float student and one float teacher (its shared knowledge is its own feature; the combined
    teacher is its class output): every term and the gradients of the total equal torchvision's SSDs run
    eagerly in training mode, with mutual learning written out here per anchor (IoU matching, softmax
    classes) and attention at the taps read by forward hooks."""
    torch.manual_seed(0)
    arch = "ssdlite320_mobilenet_v3_large"
    spec = det_spec(arch, teachers=1, bits=FULL_PRECISION, taps={"teachers": list(TAPS)})
    spec.teachers[0].weight_bits = spec.teachers[0].act_bits = FULL_PRECISION
    system = build_detection_system(spec)
    images, targets = torch.rand(2, 3, SIZE, SIZE), _targets()
    system.train()
    _, terms = system(images, [dict(t) for t in targets])
    terms["total"].backward()

    kwargs = spec.student.kwargs
    student = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kwargs)
    teacher = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kwargs)
    student.load_state_dict(system.student.state_dict())
    holder = system.teachers.get_submodule("teacher0").state_dict()
    teacher.load_state_dict({k if k.startswith("head.") else f"backbone.{k}": v for k, v in holder.items()})
    seen: dict[str, list] = {"student": [], "teacher": [], "heads": []}
    for name, net in (("student", student), ("teacher", teacher)):
        for node in TAPS:  # activation modules: a forward hook reads what the tap reads
            net.get_submodule(node).register_forward_hook(lambda m, i, o, name=name: seen[name].append(o))
        net.head.register_forward_hook(lambda m, i, o: seen["heads"].append(o["cls_logits"]))
    s_losses = student.train()(list(images), [dict(t) for t in targets])
    t_losses = teacher.train()(list(images), [dict(t) for t in targets])
    s_logits, t_logits = seen["heads"][0].flatten(0, 1), seen["heads"][1].flatten(0, 1)
    labels = _ssd_anchor_labels(student, images, targets)
    tau = spec.distill.tau
    z = losses.kdcl_min_logit(t_logits, s_logits, labels)
    expected = {
        "det_student": sum(s_losses.values()),
        "det_teacher": sum(t_losses.values()),
        "kl_student": losses.soft_kl(z, s_logits, tau),
        "kl_teacher": losses.soft_kl(z, t_logits, tau),
    }
    for j, tap in enumerate(t.name for t in system.networks[0].taps):
        expected[f"feature/{tap}"] = losses.attention_loss(seen["teacher"][j], seen["student"][j])
    d = spec.distill
    expected["total"] = (
        d.alpha * (expected["det_student"] + expected["det_teacher"])
        + d.beta * (expected["kl_student"] + expected["kl_teacher"])
        + d.gamma * sum(v for k, v in expected.items() if k.startswith("feature/"))
    )
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-4), key
    expected["total"].backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(
            system.student.get_parameter(name).grad, param.grad, rtol=1e-3, atol=1e-6, msg=name
        )
    assert system.teachers.get_submodule("fusion.output").logits.grad is not None


def _ssd_anchor_labels(ssd: nn.Module, images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """Each anchor's class as SSD's loss matches them (IoU matcher, 0.5), 0 for background, flattened."""
    from torchvision.ops import box_iou

    with torch.no_grad():
        image_list, prepared = ssd.transform(list(images), [dict(t) for t in targets])
        levels = list(ssd.backbone(image_list.tensors).values())
        anchors = ssd.anchor_generator(image_list, levels)
    rows = []
    for a, t in zip(anchors, prepared, strict=True):
        matched = ssd.proposal_matcher(box_iou(t["boxes"], a))
        rows.append(torch.where(matched >= 0, t["labels"][matched.clamp_min(0)], 0))
    labels = torch.cat(rows)
    assert (labels != IGNORE).all()
    return labels


def test_a_w2a2_faster_rcnn_with_two_teachers_trains_every_part():
    torch.manual_seed(0)
    system = build_detection_system(det_spec())
    system.train()
    _out, terms = system(torch.rand(2, 3, SIZE, SIZE), _targets())
    terms["total"].backward()
    assert {"det_student", "det_teacher", "kl_student/objectness", "kl_student/classes", "feature"} <= set(
        terms
    )
    for name, param in system.named_parameters():
        if param.requires_grad and "quantizer" not in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert set(system.importance()) == {*(t.name for t in system.networks[0].taps), "output", "objectness"}
    system.eval()
    with torch.no_grad():
        found = system(torch.rand(2, 3, SIZE, SIZE))
    assert len(found.student_logits) == 2 and len(found.each_teacher_logits) == 2
    assert {"boxes", "labels", "scores"} <= set(found.student_logits[0])


FUSED = {
    QUICK: ["output", "objectness"],
    "ssdlite320_mobilenet_v3_large": ["output"],
    "maskrcnn_resnet50_fpn": ["output", "objectness", "masks"],
    "keypointrcnn_resnet50_fpn": ["output", "objectness", "keypoints"],
}


@pytest.mark.parametrize("arch", list(FUSED))
def test_the_combined_teacher_detects_with_the_teachers_fused_outputs(arch):
    """eval's combined teacher: every teacher's head outputs fused by the output fusions' weights, decoded
    by the teachers' box logic. With all of a fusion's weight on one teacher it detects what that teacher
    detects (R-CNN: the RPN's outputs and the box head's, and the mask or keypoint branch's on the
    detections; SSD: the dense head's), with even weights something else."""
    torch.manual_seed(0)
    system = build_detection_system(det_spec(arch, bits=8), device="cpu", load=False).eval()
    if arch in ("maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"):  # the heads on 100 boxes: minutes
        for network in [system.student, *system.teacher_networks]:
            network.roi_heads.detections_per_img = 2
            network.rpn._pre_nms_top_n["testing"] = network.rpn._post_nms_top_n["testing"] = 50
    images = torch.rand(2, 3, SIZE, SIZE)
    fusion = system.teachers.get_submodule("fusion")
    names = [n for n in ("output", "objectness", "masks", "keypoints") if hasattr(fusion, n)]
    assert names == FUSED[arch]
    branch = {"masks": ["masks"], "keypoints": ["keypoints", "keypoints_scores"]}.get(names[-1], [])
    for k in (0, 1):
        with torch.no_grad():
            for name in names:
                fusion.get_submodule(name).logits.copy_(torch.tensor([60.0, -60.0][:: 1 if k == 0 else -1]))
            found = system(images)
        assert sum(len(d["boxes"]) for d in found.teacher_logits) > 0
        for combined, own in zip(found.teacher_logits, found.each_teacher_logits[k], strict=True):
            assert torch.equal(combined["labels"], own["labels"])
            torch.testing.assert_close(combined["boxes"], own["boxes"], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(combined["scores"], own["scores"], rtol=1e-5, atol=1e-5)
            for key in branch:  # the branch's logits fused on the same boxes: the teacher's own reading
                torch.testing.assert_close(combined[key], own[key], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for name in names:
            fusion.get_submodule(name).logits.zero_()
        even = system(images).teacher_logits
    assert not all(
        len(a["boxes"]) == len(b["boxes"]) and torch.allclose(a["scores"], b["scores"])
        for a, b in zip(even, found.each_teacher_logits[1], strict=True)
    )


@pytest.mark.parametrize("arch", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_mask_logits_and_keypoint_heatmaps_learn_on_the_students_positive_proposals(arch):
    """Mutual learning on the mask or keypoint branch: the student's samples are exactly what torchvision's
    own loss reads (its positive proposals in order, their class's mask channel, the targets: the BCE of the
    per-pixel logits on torchvision's soft targets, or the cross-entropy of the heatmaps, is its
    loss_mask / loss_keypoint); the teacher's head runs on the same proposals (KDCL-MinLogit pairs them
    sample for sample); the KL terms train the student's branch."""
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    from cmtkd_graph.detection_system import positive_objects

    torch.manual_seed(0)
    name = "masks" if arch.startswith("mask") else "keypoints"
    system = build_detection_system(det_spec(arch, teachers=1), load=False)
    system.train()
    images, targets = torch.rand(2, 3, SIZE, SIZE), _targets()
    student = system.student
    image_list, prepared = student.prepare(images, [dict(t) for t in targets])
    found, mine = student.losses(image_list, student.encode(image_list.tensors)[0], prepared)
    assert mine.positives is not None and mine.positive_classes.numel() > 0
    if name == "masks":
        matched, _ = positive_objects(student.roi_heads, mine.proposals, prepared)
        side = 28  # torchvision's mask head: 14 x 14 pooled regions, upsampled once
        soft = torch.cat(
            [
                project_masks_on_boxes(t["masks"], boxes, objects, side).flatten()
                for boxes, objects, t in zip(mine.positives, matched, prepared, strict=True)
            ]
        )
        bce = nn.functional.binary_cross_entropy_with_logits(mine.logits[name], soft)
        torch.testing.assert_close(bce, found["loss_mask"])
        assert (
            torch.equal(mine.labels[name], (soft >= 0.5).long())
            and 0 < mine.labels[name].sum() < soft.numel()
        )
    else:
        ce = nn.functional.cross_entropy(mine.logits[name], mine.labels[name], ignore_index=IGNORE)
        torch.testing.assert_close(ce, found["loss_keypoint"])
        assert (mine.labels[name] != IGNORE).any()
    _, terms = system(images, targets)
    assert terms[f"kl_student/{name}"] > 0 and terms[f"kl_teacher/{name}"] > 0
    branch = "mask_predictor" if name == "masks" else "keypoint_predictor"
    predictor = list(getattr(student.roi_heads, branch).parameters())
    grads = torch.autograd.grad(terms[f"kl_student/{name}"], predictor, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert name in {n for n, _ in system.teachers.get_submodule("fusion").named_children()}


def test_the_example_labels_fit_a_keypoint_rcnn_and_it_trains_a_step_on_them():
    """What the precision probe trains on: a Keypoint R-CNN's example objects carry as many keypoints as
    it predicts (its kwargs' num_keypoints, else torchvision's 17), inside their box."""
    task = TASKS.get("detection")
    assert task.example_labels(1, 3, (3, SIZE, SIZE))[0].keys() == {"boxes", "labels", "masks"}
    default = det_spec("keypointrcnn_resnet50_fpn").model_copy(deep=True)
    default.student.kwargs.pop("num_keypoints")
    assert task.example_labels(1, 3, (3, SIZE, SIZE), spec=default)[0]["keypoints"].shape == (1, 17, 3)
    spec = det_spec("keypointrcnn_resnet50_fpn", teachers=0, method="single")
    labels = task.example_labels(2, 3, (3, SIZE, SIZE), "cpu", spec)
    points, box = labels[0]["keypoints"][0], labels[0]["boxes"][0]
    assert points.shape == (4, 3) and (points[:, 2] == 2).all()
    assert ((points[:, :2] >= box[:2]) & (points[:, :2] <= box[2:])).all()
    system = build_detection_system(spec, load=False)
    system.train()
    _, terms = system(torch.rand(2, 3, SIZE, SIZE), labels)
    assert terms["det_student/loss_keypoint"] > 0
    terms["total"].backward()


def test_the_student_alone_trains_with_its_own_losses():
    system = build_detection_system(det_spec(teachers=0, method="single"))
    system.train()
    _, terms = system(torch.rand(1, 3, SIZE, SIZE), _targets(1))
    assert set(terms) == {
        "det_student/loss_classifier",
        "det_student/loss_box_reg",
        "det_student/loss_objectness",
        "det_student/loss_rpn_box_reg",
        "det_student",
        "total",
    }
    assert system.teachers is None


@pytest.mark.parametrize("arch", DETECTORS)
def test_every_detector_composes_with_two_teachers_as_the_models_page_says(arch):
    """W2A2 student and two W2A2 teachers at the auto taps, built on the meta device, every network's
    layers run forward and backward there (backbones composed, every head): the row of docs/models.md is
    what this build shows, and the fusions are the outputs that line up."""
    spec = support.support_spec(arch)
    system = support.compose_check(spec)
    row = support.read_page((REPO / "docs" / "models.md").read_text())[arch]
    assert (row.task, row.composes) == ("detection", "yes")
    assert row.structure() == support.structure(spec, system)
    fusions = {name for name, _ in system.teachers.get_submodule("fusion").named_children()}
    assert "output" in fusions and ("objectness" in fusions) == arch.startswith(
        ("faster", "mask", "keypoint")
    )
    assert system.num_classes() == 10  # read before the rewrite: the trainer checks it against the data


# ---------------------------------------------------------------- the CLI
def test_the_detection_quickstart_trains_evaluates_and_scores_like_pycocotools(
    tmp_path, capsys, fashion_objects
):
    """specs/detection_quickstart.yaml in tiny mode: two training processes, resumed by one; eval reports
    COCO's mAP of the student and each teacher and writes their detections, which pycocotools scores the
    same from the annotation file; predict finds what eval wrote for an image, and draws it."""
    sets = [
        f"data.root={fashion_objects}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.train_subset=8",
        "data.eval_subset=6",
        "data.image_size=128",
        *(f"{net}.weights=null" for net in ("student", "teachers[0]", "teachers[1]")),  # no float run here
    ]
    run, train = train_tiny_example("detection_quickstart.yaml", sets, cwd=tmp_path, port=29593)
    assert all(r["loss/det_student"] > 0 and r["loss/feature"] > 0 for r in train)
    final = json.loads((run / "final.json").read_text())
    assert {"map/student", "ap50/teacher0", "ap75/teacher1", "map/combined"} <= set(final["accuracy"])
    table = cli(tmp_path, "eval", str(run))
    assert "mAP" in table
    record = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert record["task"] == "detection" and record["samples"] == 6
    written = json.loads(
        (
            run / "eval" / next(p.name for p in (run / "eval").iterdir() if p.is_dir()) / "student.json"
        ).read_text()
    )
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(fashion_objects / "annotations" / "instances_val.json"))
        evaluated = sorted(truth.getImgIds())[:6]
        scored = COCOeval(truth, truth.loadRes(written) if written else COCO(), "bbox")
        scored.params.imgIds = evaluated
        scored.evaluate(), scored.accumulate(), scored.summarize()
    assert record["map/student"] == pytest.approx(100 * max(scored.stats[0], 0.0), abs=1e-9)
    from cmtkd_graph.cli import main

    # export: torch, codes and Q/DQ ONNX; the box head's MACs on every proposal of the example image
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert "cost per image" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "exported" / "manifest.json").read_text())
    assert (
        set(manifest["files"]) == {"torch", "codes", "onnx"}
        and "not for detection" in manifest["openvino"]["skipped"]
    )
    section = manifest["onnx"]
    assert (section["tracer"], section["answers"], section["opset"], section["batch"]) == (
        "torchscript",
        "detections",
        20,
        1,
    )
    assert section["check_images"] == 6 and min(section["detections"]) > 0  # compared on detections
    assert section["check_source"].startswith("the run's evaluation data")  # its 6 scenes
    macs = {layer["name"]: layer["macs"] for layer in manifest["layers"]}
    assert macs["backbone.body.0.0"] == (64 * 64 * 16) * (3 * 3 * 3)  # the stem, stride 2 at 128 px
    proposals, rest = divmod(macs["roi_heads.box_head.fc6"], 256 * 7 * 7 * 1024)
    assert rest == 0 and 0 < proposals <= 150  # the 320 model's proposals after NMS, at most 150
    assert macs["roi_heads.box_predictor.cls_score"] == proposals * 1024 * 11
    from cmtkd_graph.deploy.integer import integer_student
    from cmtkd_graph.deploy.student import load_student

    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the codes on integers: the backbone's maps as the student's
        student, integer = load_student(run), integer_student(tmp_path / "exported")
        for level, value in integer.backbone(x).items():
            torch.testing.assert_close(value, student.backbone(x)[level], rtol=1e-3, atol=1e-3)

    # predict: the student's detections of an evaluation image, in its pixels, as eval wrote them
    image = fashion_objects / "val" / truth.loadImgs(evaluated[0])[0]["file_name"]
    argv = ["predict", str(run), str(image), "--json", "--min-score", "0", "--draw", str(tmp_path / "drawn")]
    assert main(argv) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["image"] == str(image) and (tmp_path / "drawn" / f"{image.stem}.png").is_file()
    mine = [r for r in written if r["image_id"] == evaluated[0]]
    assert [d["score"] for d in answer["detections"]] == pytest.approx([r["score"] for r in mine])
    for d, r in zip(answer["detections"], mine, strict=True):
        x, y, w, h = r["bbox"]
        assert d["box"] == pytest.approx([x, y, x + w, y + h]) and d["class"] in final_classes(run)
    # predict from the ONNX: onnxruntime's detections of the image, scaled to its pixels the same way
    exported = tmp_path / "exported"
    argv = ["predict", str(exported), str(image), "--json", "--min-score", "0", "--backend", "onnx"]
    assert main(argv) == 0
    (from_onnx,) = json.loads(capsys.readouterr().out)
    import onnxruntime as ort

    from cmtkd_graph.deploy.predict_objects import read_whole_images

    session = ort.InferenceSession(str(exported / "student.onnx"), providers=["CPUExecutionProvider"])
    boxes, labels, scores = session.run(None, {"images": read_whole_images([image], 128)[0].numpy()})
    assert len(scores) > 0
    assert [d["score"] for d in from_onnx["detections"]] == pytest.approx(scores.tolist())
    assert [d["index"] for d in from_onnx["detections"]] == labels.tolist()
    height, width = truth.loadImgs(evaluated[0])[0]["height"], truth.loadImgs(evaluated[0])[0]["width"]
    scale = [width / 128, height / 128] * 2
    for d, box in zip(from_onnx["detections"], boxes, strict=True):
        assert d["box"] == pytest.approx([c * f for c, f in zip(box.tolist(), scale, strict=True)], rel=1e-5)
    assert main(["predict", str(exported), str(image), "--backend", "openvino"]) == 2
    assert "students run as trained (torch) or from their Q/DQ ONNX (onnx)" in capsys.readouterr().err


def test_the_onnx_of_a_detector_is_pytorchs_detections_where_activations_do_not_round(tmp_path):
    """With float activations (4-bit weights, written as their integers and DequantizeLinear), nothing
    rounds at a level boundary: onnxruntime's detections (boxes, classes, scores and masks of the one
    image the file takes) are the student's within float rounding on every check image, so the tracer
    recorded the box logic (proposals, NMS, RoI pooling, mask pasting) as PyTorch runs it and the
    symbolic functions wrote each quantized weight. (With 4-bit activations, sums in another order move
    values across levels: the quickstart's export finds 95 % of the detections both ways, docs/tasks.md.)
    A Mask R-CNN: untrained, its scores differ (an untrained MobileNetV3 detector scores every detection
    alike, and ties leave the order to the runtime)."""
    arch = "maskrcnn_resnet50_fpn"
    from cmtkd_graph.deploy.codes import quantized_layers
    from cmtkd_graph.deploy.onnx_export import export_onnx
    from cmtkd_graph.deploy.student import build_student
    from cmtkd_graph.spec.io import load_spec

    overrides = [
        f"student.arch={arch}",
        "student.kwargs={num_classes: 11, box_detections_per_img: 20}",
        "student.act_bits=32",
        "student.weights=null",
        "teachers=[]",
        "method=single",
        "taps={}",
        "data.image_size=96",
    ]
    spec = load_spec(REPO / "specs" / "detection_quickstart.yaml", overrides)
    torch.manual_seed(0)
    student = build_student(spec)
    layers = quantized_layers(student)
    records = [{} for _ in layers]
    section = export_onnx(
        student,
        layers,
        records,
        tmp_path / "detector.onnx",
        input_shape=spec.data.input_shape(),
        tracer="torchscript",
        answers="detections",
    )
    assert section["batch"] == 1 and section["images_within_tolerance"] == section["check_images"] == 8
    assert section["detection_agreement"] == 1.0 and section["max_abs_diff"] < 1e-2, section
    assert min(section["detections"]) > 0  # compared on detections
    assert not any(r["onnx"]["inputs"] for r in records)
    assert {w["type"] for r in records for w in r["onnx"]["weights"]} == {"INT8"}
    import onnx

    model = onnx.load(str(tmp_path / "detector.onnx"))
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["boxes", "labels", "scores", "masks"]
    dequantized = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert dequantized == sum(len(r["onnx"]["weights"]) for r in records) > 40


def final_classes(run) -> list[str]:
    return json.loads((run / "final.json").read_text())["classes"]


def test_validate_taps_and_inspect_say_what_there_is(tmp_path, capsys, fashion_objects):
    """validate names the objective and the input, taps lists the backbone's nodes, inspect shows every
    part (backbone, RPN head, box head and predictor) with its precision, the shared knowledge at the
    backbone's taps and the fused outputs of the mutual learning (class logits, objectness)."""
    from cmtkd_graph.cli import main

    spec = str(REPO / "specs" / "detection_quickstart.yaml")
    assert main(["validate", spec, "--no-build", "--set", f"data.root={fashion_objects}"]) == 0
    summary = capsys.readouterr().out
    assert "task detection" in summary and "DET_T + DET_S" in summary and "input 3x256x256" in summary
    assert main(["taps", QUICK, "--input-size", "128"]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"{QUICK} (backbone)") and "backbone.body.1.add" in table.splitlines()[-1]
    assert main(["inspect", spec, "--out", str(tmp_path / "graph.json")]) == 0
    import networkx as nx

    graph = nx.node_link_graph(json.loads((tmp_path / "graph.json").read_text()), edges="edges")
    head = graph.nodes["student/rpn.head.conv.0.0"]
    assert head["weight_bits"] == 4 and head["module"] == "rpn.head.conv.0.0"
    assert graph.nodes["teacher1/roi_heads.box_head.fc6"]["weight_bits"] == 8
    assert graph.nodes["student/roi_heads.box_predictor.cls_score"]["weight_bits"] == FULL_PRECISION
    assert graph.nodes["fusion/backbone_body_12_add"]["output_shape"] == [2, 112, 16, 16]
    for name, part in (("output", "roi_heads.box_predictor"), ("objectness", "rpn.head")):
        assert graph.has_edge(f"teacher0/{part}:output", f"fusion/{name}")
        assert graph.has_edge(f"student/{part}:output", f"loss/{name}")
    assert graph.has_edge("student/backbone.body.12.add", "loss/backbone.body.12.add")
    # the RPN head's convolution runs once per feature level: one weight quantizer into every call, and
    # each call's own input quantizer a data edge (no quantizer of one level drawn into another's call)
    calls = [
        n
        for n, a in graph.nodes(data=True)
        if a.get("module") == "rpn.head.conv.0.0" and n.startswith("student/")
    ]
    assert len(calls) == 3
    assert {v for _, v in graph.out_edges("student/rpn.head.conv.0.0.weight_quantizer")} == set(calls)
    assert all(a["kind"] in ("data", "weight", "distill") for _, _, a in graph.edges(data=True))
    for call in calls:
        sources = [u for u, _, a in graph.in_edges(call, data=True) if a["kind"] == "data"]
        assert len(sources) == 1 and graph.nodes[sources[0]]["role"] == "quantizer"
    # the composed teachers' layers and blocks carry the backbone's path, as the student's
    layer = graph.nodes["teacher0/backbone.body.3.block.0.0"]
    assert layer["block"].startswith("teacher0/backbone.body.3")
    assert graph.has_edge(
        "teacher0/backbone.body.3.block.0.0.weight_quantizer", "teacher0/backbone.body.3.block.0.0"
    )
