"""`task: segmentation`: the six torchvision builders rewritten and composed, every pixel a sample of the
objective (checked against torch's own 4-D cross-entropy and by hand), mIoU from a hand-counted confusion
matrix, the generated scenes, and a W2A2 student trained, evaluated, exported and asked for masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cmtkd_graph as cg
from cmtkd_graph.data import build_datasets
from cmtkd_graph.data.scenes import SCENE_CLASSES, make_scene
from cmtkd_graph.losses import kdcl_min_logit
from cmtkd_graph.models.facts import family_of
from cmtkd_graph.quantizers.layers import QuantConv2d
from cmtkd_graph.registry import TASKS
from cmtkd_graph.tasks import IGNORE

SEGMENTATION = TASKS.get("segmentation")
BUILDERS = [
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]
SCENES = "data={dataset: fashion_scenes, batch_size: 8, num_workers: 0, train_subset: 64, eval_subset: 16}"


def scene_spec(arch: str, *extra: str) -> cg.Spec:
    return cg.load_spec(
        "quickstart",
        [f"student.arch={arch}", "student.kwargs={num_classes: 11}", SCENES, "taps={teachers: auto}", *extra],
    )


@pytest.mark.parametrize("arch", BUILDERS)
def test_every_segmentation_builder_is_composed_with_quantizers_and_backbone_taps(arch, fashion_mnist):
    assert set(SEGMENTATION.model_names()) == set(BUILDERS)
    spec = scene_spec(arch)
    assert spec.resolved_task == "segmentation"
    system = cg.build_system(spec, device="meta", load=False)
    assert system.num_classes() == 11
    # shared knowledge forms at the backbone's stages and at the output
    assert set(system.importance()) == {*family_of(arch).auto_taps.names, "output"}
    layers = [m for m in system.student.modules() if isinstance(m, torch.nn.Conv2d)]
    quantized = [m for m in layers if isinstance(m, QuantConv2d)]
    assert not isinstance(layers[0], QuantConv2d)  # the stem
    heads = 2 if arch.startswith("lraspp") else 1  # the layers whose output is the prediction
    assert len(layers) - len(quantized) == 1 + heads
    assert all(m.weight_quantizer.bits == 2 for m in quantized)


def test_a_pixel_is_a_sample_of_the_objective():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 1, 2] = labels[1, 0, 0] = IGNORE
    z, y = SEGMENTATION.sample_logits(logits), SEGMENTATION.sample_labels(labels)
    assert z.shape == (30, 4) and torch.equal(z[7], logits[0, :, 1, 2]) and y[7] == IGNORE
    # the methods' cross-entropy on the samples is torch's per-pixel cross-entropy with its ignore index
    assert torch.allclose(F.cross_entropy(z, y), F.cross_entropy(logits, labels, ignore_index=IGNORE))
    teacher, student = torch.randn(30, 4), torch.randn(30, 4)
    target = kdcl_min_logit(teacher, student, y, may_ignore=True)
    labelled = y != IGNORE
    c = y[labelled]
    shifted = torch.minimum(
        teacher[labelled] - teacher[labelled].gather(1, c[:, None]),
        student[labelled] - student[labelled].gather(1, c[:, None]),
    )
    assert torch.equal(target[labelled], shifted)
    assert torch.equal(target[~labelled], teacher[~labelled])  # no class to align on: the combined teacher


def test_miou_and_pixel_accuracy_from_a_hand_counted_confusion_matrix():
    # 2 images of 2x2 pixels, 3 classes; the last pixel of image 1 is ignored
    truth = torch.tensor([[[0, 0], [1, 2]], [[1, 1], [2, IGNORE]]])
    predicted = torch.tensor([[[0, 1], [1, 2]], [[1, 0], [2, 2]]])
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    state = SEGMENTATION.metric_rows(logits, truth).sum(0)
    # confusion (truth x predicted): 0->0 1, 0->1 1; 1->1 2, 1->0 1; 2->2 2
    assert state.view(3, 3).tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 2]]
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 2 / 2]  # tp / (truth + predicted - tp)
    values = SEGMENTATION.metric_values(state)
    assert values["miou"] == pytest.approx(100 * sum(iou) / 3)
    assert values["pixacc"] == pytest.approx(100 * 5 / 7)
    assert values["iou"] == pytest.approx([100 * v for v in iou])
    # a label the model has no class for (a raw 255, a larger dataset) counts nowhere, like IGNORE
    stray = truth.clone()
    stray[1, 1, 1] = 255
    assert torch.equal(SEGMENTATION.metric_rows(logits, stray).sum(0), state)
    # a fourth class that neither the labels nor the predictions have: no IoU, not in the mean
    four = SEGMENTATION.metric_rows(torch.cat([logits, torch.full((2, 1, 2, 2), -9.0)], 1), truth).sum(0)
    with_absent = SEGMENTATION.metric_values(four)
    assert with_absent["iou"][3] is None and with_absent["miou"] == pytest.approx(values["miou"])


def test_fashion_scenes_are_reproducible_and_augmented_with_their_masks(fashion_mnist):
    items = torch.zeros(3, 28, 28, dtype=torch.uint8)
    items[:, 4:24, 4:24] = 200
    items[:, 3, 4:24] = 40  # a faint rim row
    image, mask = make_scene(items, torch.tensor([0, 3, 9]), 64, seed=7)
    again, same = make_scene(items, torch.tensor([0, 3, 9]), 64, seed=7)
    assert torch.equal(image, again) and torch.equal(mask, same)
    assert set(mask.unique().tolist()) <= {IGNORE, 0, 1, 4, 10} and (mask == IGNORE).any()
    spec = scene_spec("lraspp_mobilenet_v3_large")
    bundle = build_datasets(spec.data)
    assert bundle.classes == SCENE_CLASSES and bundle.num_classes == 11
    for index in range(8):  # after the random crop and flip, the objects are where their mask is
        x, m = bundle.train[index]
        assert x.shape == (3, 64, 64) and m.shape == (64, 64) and m.dtype == torch.long
        brightness = x.mean(0)
        assert brightness[m > 0].mean() > brightness[m == 0].mean() + 1.0


def test_methods_and_pipelines_that_do_not_apply_are_one_line(fashion_mnist):
    with pytest.raises(cg.SpecError, match=r"^method: amtml_kd is for classification \(its teacher weights"):
        teacher = "{weights: x, trainable: false, weight_bits: 32, act_bits: 32}"
        scene_spec("lraspp_mobilenet_v3_large", "method=amtml_kd", f"teachers=[{teacher}]")
    with pytest.raises(cg.SpecError, match=r"^student.kwargs.aux_loss: the auxiliary head is not trained"):
        scene_spec("lraspp_mobilenet_v3_large", "student.kwargs={num_classes: 11, aux_loss: true}")
    with pytest.raises(cg.SpecError, match=r"data.pipeline: device decodes class-labelled images"):
        scene_spec("lraspp_mobilenet_v3_large", "data.pipeline=device")
    with pytest.raises(cg.SpecError, match=r"data.dataset: fashion_mnist holds classification data"):
        cg.load_spec("quickstart", ["student.arch=lraspp_mobilenet_v3_large"])


def cli(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cmtkd_graph", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_w2a2_segmentation_student_trains_evaluates_exports_and_predicts_masks(tmp_path, fashion_mnist):
    sets = [
        "student.arch=lraspp_mobilenet_v3_large",
        "student.kwargs={num_classes: 11}",
        SCENES,
        "taps={teachers: auto}",
        "train.max_steps=2",
        "train.log_every=1",
        "train.progress_bar=false",
        "train.mixed_precision=no",
        "train.channels_last=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    cli(tmp_path, "train", "quickstart", *[a for s in sets for a in ("--set", s)])
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["loss/kl_student"] > 0 for r in train)
    final = json.loads((run / "final.json").read_text())
    assert set(final["accuracy"]) == {
        f"{m}/{n}" for m in ("miou", "pixacc") for n in ("student", "combined", "teacher0", "teacher1")
    }
    assert final["classes"] == SCENE_CLASSES

    table = cli(tmp_path, "eval", str(run))
    assert "mIoU %" in table and "pixel acc. %" in table and "final.json mIoU" in table
    record = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert record["task"] == "segmentation" and record["samples"] == 16
    assert record["miou/student"] == pytest.approx(final["accuracy"]["miou/student"])

    cli(tmp_path, "export", str(run), "--out", "exported", "--format", "torch")
    scene, _ = make_scene(*_items(), 64, seed=3)
    # a photo of another size: resized whole for the model, the mask mapped back onto it
    Image.fromarray(scene.permute(1, 2, 0).numpy()).resize((96, 80)).save(tmp_path / "scene.png")
    answer = json.loads(
        cli(tmp_path, "predict", "exported", "scene.png", "--top", "2", "--masks", "masks", "--json")
    )
    shares = [p["share"] for p in answer[0]["predictions"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    mask = np.array(Image.open(tmp_path / answer[0]["mask"]))
    assert mask.shape == (80, 96) and mask.max() < 11
    top = answer[0]["predictions"][0]
    assert top["share"] == pytest.approx((mask == top["index"]).mean(), abs=0.03)


def _items() -> tuple[torch.Tensor, torch.Tensor]:
    from cmtkd_graph.data.fashion_mnist import read_fashion_mnist

    items, labels = read_fashion_mnist(None).eval
    return items[:3, 0], labels[:3]


def test_a_study_of_segmentation_rows_reports_their_metrics(tmp_path, fashion_mnist):
    from cmtkd_graph.errors import UserError
    from cmtkd_graph.study.plan import check_metrics
    from cmtkd_graph.study.report import _title
    from cmtkd_graph.study.run import training_curve
    from cmtkd_graph.study.spec import load_study

    rows = [{"name": "alone", "set": ["method=single", "teachers=[]", "distill={}"]}, {"name": "cmtkd"}]
    study = {
        "name": "seg",
        "base": "quickstart",
        "set": [
            f"student.arch={BUILDERS[-1]}",
            "student.kwargs={num_classes: 11}",
            SCENES,
            "taps={teachers: auto}",
        ],
        "rows": rows,
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    with pytest.raises(UserError) as err:  # the default columns are top-1: every cell would be empty
        check_metrics(load_study(path))
    assert err.value.problems[0] == (
        "rows (alone): a segmentation run reports miou, pixacc; the study's metrics name none of them: "
        "set metrics: [miou/student, pixacc/student, ...]"
    )
    path.write_text(
        json.dumps({**study, "metrics": ["miou/student", "miou/combined"], "chart": ["miou/student"]})
    )
    check_metrics(load_study(path))
    assert _title("miou/combined") == "combined mIoU" and _title("acc1/student") == "student top-1"
    curve = training_curve([{"kind": "eval", "epoch": 1, "miou/student": 7.3, "iou/student": [1.0, None]}])
    assert curve == [{"epoch": 1, "miou/student": 7.3}]
