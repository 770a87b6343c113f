"""`task: segmentation`: the six torchvision builders rewritten and composed, every pixel a sample of the
objective (checked against torch's own 4-D cross-entropy and by hand), mIoU from a hand-counted confusion
matrix, the generated scenes, and a W2A2 student trained, evaluated, exported and asked for masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import cmtkd_graph as cg
from cmtkd_graph.data import build_datasets
from cmtkd_graph.data.scenes import SCENE_CLASSES, make_scene
from cmtkd_graph.data.segmentation_files import UNLABELLED, BadMaskError, voc_palette
from cmtkd_graph.inspection import support
from cmtkd_graph.losses import kdcl_min_logit
from cmtkd_graph.models.facts import family_of
from cmtkd_graph.quantizers.layers import QuantConv2d
from cmtkd_graph.registry import TASKS
from cmtkd_graph.tasks import IGNORE

from .conftest import cli, train_tiny_example

MODELS_PAGE = Path(__file__).resolve().parents[1] / support.PAGE
SEGMENTATION = TASKS.get("segmentation")
BUILDERS = [
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]


def scenes(root: Path) -> str:
    """The data of a spec: the session's prepared scenes (conftest's fashion_scenes)."""
    return (
        f"data={{dataset: fashion_scenes, root: {root}, batch_size: 8, num_workers: 0, train_subset: 64, "
        "eval_subset: 16}"
    )


def scene_spec(root: Path, arch: str, *extra: str) -> cg.Spec:
    return cg.load_spec(
        "quickstart",
        [
            f"student.arch={arch}",
            "student.kwargs={num_classes: 11}",
            scenes(root),
            "taps={teachers: auto}",
            *extra,
        ],
    )


@pytest.mark.parametrize("arch", BUILDERS)
def test_every_segmentation_builder_is_composed_with_quantizers_and_backbone_taps(arch, fashion_scenes):
    """W2A2 student, W4A4 and W8A8 teachers fused at the auto taps, with the auxiliary head where the
    builder has one: forward and backward (meta device)."""
    assert set(SEGMENTATION.model_names()) == set(BUILDERS)
    aux = not arch.startswith("lraspp")
    spec = scene_spec(
        fashion_scenes, arch, f"student.kwargs={{num_classes: 11, aux_loss: {str(aux).lower()}}}"
    )
    assert spec.resolved_task == "segmentation"
    system = cg.build_system(spec, device="meta", load=False)
    assert system.num_classes() == 11
    # shared knowledge forms at the backbone's stages and at the output
    assert set(system.importance()) == {*family_of(arch).auto_taps.names, "output"}
    layers = [m for m in system.student.modules() if isinstance(m, torch.nn.Conv2d)]
    quantized = [m for m in layers if isinstance(m, QuantConv2d)]
    assert not isinstance(layers[0], QuantConv2d)  # the stem
    heads = 2 if arch.startswith("lraspp") else 1 + aux  # the layers whose output is a prediction
    assert len(layers) - len(quantized) == 1 + heads
    assert all(m.weight_quantizer.bits == 2 for m in quantized)
    if aux:  # the auxiliary head: quantized but for its prediction layer, as the main head
        assert isinstance(system.student.get_submodule("aux_classifier.0"), QuantConv2d)

    x = torch.empty(2, *spec.data.input_shape(), device="meta")
    system.eval()  # meta: batch norm's training kernel is slow Python there; the graph is the same
    out = system(x)
    assert out.student_logits.shape == out.teacher_logits.shape == (2, 11, 64, 64)
    if aux:
        assert out.student_aux.shape == out.each_teacher_aux[1].shape == (2, 11, 64, 64)
    else:
        assert out.student_aux is None and out.each_teacher_aux == ()
    terms = system.losses(out, torch.zeros(2, 64, 64, dtype=torch.long, device="meta"))
    assert ("aux" in terms) == aux
    row = support.read_page(MODELS_PAGE.read_text())[arch]  # docs/models.md says what this build shows
    shown, found = row.structure(), support.structure(spec, system)
    if aux:  # the page's rows are without the auxiliary head (its quantized layer and float prediction)
        shown.pop("quantized"), found.pop("quantized")
    assert shown == found
    terms["total"].backward()
    fusion = next(m for m in system.teachers.modules() if isinstance(m, cg.fusion.ImportanceFusion))
    assert fusion.logits.grad is not None


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


def test_fashion_scenes_are_made_once_in_the_voc_layout_and_read_back_exactly(fashion_scenes):
    items = torch.zeros(3, 28, 28, dtype=torch.uint8)
    items[:, 4:24, 4:24] = 200
    items[:, 3, 4:24] = 40  # a faint rim row
    image, mask = make_scene(items, torch.tensor([0, 3, 9]), 64, seed=7)
    again, same = make_scene(items, torch.tensor([0, 3, 9]), 64, seed=7)
    assert torch.equal(image, again) and torch.equal(mask, same)
    assert set(mask.unique().tolist()) <= {UNLABELLED, 0, 1, 4, 10} and (mask == UNLABELLED).any()

    # the prepared root (conftest: the real command on 300 + 90 real items): VOC's layout and lists
    lists = fashion_scenes / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text().split() == [f"train_{i:06d}" for i in range(100)]
    assert (lists / "val.txt").read_text().split() == [f"val_{i:06d}" for i in range(30)]
    png = Image.open(fashion_scenes / "SegmentationClass" / "val_000001.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC's colour of class 1
    items, labels = _items(slice(3, 6))
    image, mask = make_scene(items, labels, 64, seed=(1 << 30) + 1)  # evaluation scene 1
    assert np.array_equal(np.array(png), mask.numpy())
    jpeg = np.array(Image.open(fashion_scenes / "JPEGImages" / "val_000001.jpg")).astype(float)
    assert np.abs(jpeg - image.permute(1, 2, 0).numpy()).mean() < 3.5  # JPEG, quality 95

    bundle = build_datasets(scene_spec(fashion_scenes, "lraspp_mobilenet_v3_large").data)
    assert bundle.classes == SCENE_CLASSES and bundle.num_classes == 11
    assert (len(bundle.train), len(bundle.eval)) == (64, 16)
    _, read = bundle.eval[1]  # the reader: unlabelled 255 -> IGNORE
    assert torch.equal(read, mask.long().masked_fill(mask == UNLABELLED, IGNORE))
    for index in range(8):  # after the random crop and flip, the objects are where their mask is
        x, m = bundle.train[index]
        assert x.shape == (3, 64, 64) and m.shape == (64, 64) and m.dtype == torch.long
        brightness = x.mean(0)
        assert brightness[m > 0].mean() > brightness[m == 0].mean() + 1.0


def test_voc_palette_is_vocs():
    palette = voc_palette()
    assert palette[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert palette[15] == (192, 128, 128)  # person
    assert palette[255] == (224, 224, 192)  # the boundary colour
    assert len(set(palette)) == 256


def _as_mask_folders(scenes: Path, root: Path, rgb_eval: bool) -> None:
    """The first 6 training and 3 evaluation scenes as image/mask folders: grey masks of class indices
    for training, RGB colour masks (read through labelmap.txt) for evaluation when ``rgb_eval``."""
    palette = np.array(voc_palette(), dtype=np.uint8)
    for split, count in (("train", 6), ("val", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(count):
            name = f"{split}_{i:06d}"
            shutil.copy(scenes / "JPEGImages" / f"{name}.jpg", root / split / "images" / f"{name}.jpg")
            mask = np.array(Image.open(scenes / "SegmentationClass" / f"{name}.png"))
            written = Image.fromarray(palette[mask]) if split == "val" and rgb_eval else Image.fromarray(mask)
            written.save(root / split / "masks" / f"{name}.png")


def test_mask_folders_read_grey_and_colour_masks_as_the_voc_reader_does(fashion_scenes, tmp_path):
    root = tmp_path / "folders"
    _as_mask_folders(fashion_scenes, root, rgb_eval=True)
    shutil.copy(fashion_scenes / "labelmap.txt", root)
    plain = "data.augment={crop: none, hflip: false}", "data.normalize=false", "data.image_size=64"
    spec = scene_spec(root, BUILDERS[-1], "data.dataset=mask_folders", *plain)
    voc = build_datasets(scene_spec(fashion_scenes, BUILDERS[-1], *plain).data)
    folders = build_datasets(spec.data)
    assert folders.classes == SCENE_CLASSES and (len(folders.train), len(folders.eval)) == (6, 3)
    for split in ("train", "eval"):
        for i in range(len(getattr(folders, split))):
            x, m = getattr(folders, split)[i]
            y, n = getattr(voc, split)[i]
            assert torch.equal(m, n) and torch.equal(x, y)

    (root / "labelmap.txt").unlink()  # names alone: grey masks still read, colour ones cannot be
    (root / "classes.txt").write_text("\n".join(SCENE_CLASSES) + "\n")
    folders = build_datasets(spec.data)
    assert torch.equal(folders.train[0][1], voc.train[0][1])
    with pytest.raises(
        BadMaskError, match=r"val_000000.png is an RGB image: its colours need the data root's"
    ):
        folders.eval[0]
    (root / "classes.txt").unlink()
    with pytest.raises(cg.UserError, match=r"no labelmap.txt or classes.txt; write the class names there"):
        build_datasets(spec.data)


def test_the_mask_files_and_layouts_users_have_are_read(fashion_scenes, tmp_path):
    """1-bit and grey+alpha masks, VOC ids whose images are PNGs, labelmap lines without a colour, a
    scenes root that lost its labelmap.txt, and an all-skipped batch's empty masks."""
    voc = tmp_path / "voc"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    masks = {}
    for split, ids in (("train", ["train_000000", "train_000001"]), ("val", ["val_000000"])):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            Image.open(fashion_scenes / "JPEGImages" / f"{i}.jpg").save(voc / "JPEGImages" / f"{i}.png")
            masks[i] = np.array(Image.open(fashion_scenes / "SegmentationClass" / f"{i}.png"))
    foreground = (masks["train_000000"] > 0) & (masks["train_000000"] < 255)
    Image.fromarray(foreground).save(voc / "SegmentationClass" / "train_000000.png")  # mode "1"
    with_alpha = Image.fromarray(
        np.stack([foreground.astype(np.uint8), np.full_like(foreground, 255, np.uint8)], -1)
    )
    with_alpha.save(voc / "SegmentationClass" / "train_000001.png")  # mode "LA"
    Image.fromarray(foreground.astype(np.uint8)).save(voc / "SegmentationClass" / "val_000000.png")
    (voc / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:::\nitem:::\n")
    data = scene_spec(
        voc, BUILDERS[-1], "data.dataset=voc", "data.image_size=64", "data.augment={crop: none, hflip: false}"
    ).data
    bundle = build_datasets(data)
    assert bundle.classes == ["background", "item"]
    for i in range(2):
        assert torch.equal(bundle.train[i][1], torch.from_numpy(foreground).long())

    scenes_copy = tmp_path / "scenes"
    shutil.copytree(fashion_scenes, scenes_copy, ignore=shutil.ignore_patterns("labelmap.txt"))
    assert build_datasets(scene_spec(scenes_copy, BUILDERS[-1]).data).classes == SCENE_CLASSES  # not VOC's

    from cmtkd_graph.data import DropSkipped

    images, labels = DropSkipped((3, 64, 64), (64, 64))([None, None])
    assert images.shape == (0, 3, 64, 64) and labels.shape == (0, 64, 64)
    rows = SEGMENTATION.metric_rows(torch.empty(0, 11, 64, 64), labels)
    assert rows.shape == (0, 121)


def test_bad_masks_and_layouts_are_one_line_naming_the_file(fashion_scenes, tmp_path):
    root = tmp_path / "folders"
    _as_mask_folders(fashion_scenes, root, rgb_eval=False)
    shutil.copy(fashion_scenes / "labelmap.txt", root)
    data = scene_spec(root, BUILDERS[-1], "data.dataset=mask_folders").data
    bad = root / "val" / "masks" / "val_000001.png"
    values = np.array(Image.open(bad))
    Image.fromarray(values[:, :60]).save(root / "val" / "masks" / "val_000002.png")
    values[5, 7] = 12  # neither a class (0..10) nor 255
    Image.fromarray(values).save(bad)
    bundle = build_datasets(data)
    loader = torch.utils.data.DataLoader(bundle.eval, batch_size=1, num_workers=1)
    error = _first_error(loader)  # raised in a worker process, one line in this one
    assert isinstance(error, BadMaskError) and "\n" not in str(error)
    assert str(error).startswith(f"mask {bad}: value 12 is not a class (0..10) nor the unlabelled value 255;")
    with pytest.raises(
        BadMaskError, match=r"val_000002.png is 60x64 but its image .*val_000002.jpg is 64x64"
    ):
        bundle.eval[2]

    (root / "val" / "masks" / "val_000000.png").unlink()
    with pytest.raises(
        cg.UserError, match=r"no mask .*val_000000.png for .*val_000000.jpg; every image needs"
    ):
        build_datasets(data)
    voc = scene_spec(fashion_scenes, BUILDERS[-1], "data.eval_split=test").data
    with pytest.raises(cg.UserError, match=r"test.txt: no such split list \(found: train, val\)"):
        build_datasets(voc)


def _first_error(loader) -> Exception:
    try:
        list(loader)
    except Exception as e:
        e.__traceback__ = None  # no reference cycle keeping the workers to the garbage collector
        return e
    raise AssertionError("the loader raised nothing")


def test_methods_and_pipelines_that_do_not_apply_are_one_line(fashion_scenes):
    with pytest.raises(cg.SpecError, match=r"^method: amtml_kd is for classification \(its teacher weights"):
        teacher = "{weights: x, trainable: false, weight_bits: 32, act_bits: 32}"
        scene_spec(fashion_scenes, "lraspp_mobilenet_v3_large", "method=amtml_kd", f"teachers=[{teacher}]")
    with pytest.raises(
        cg.SpecError, match=r"^student.kwargs.aux_loss: lraspp_mobilenet_v3_large has no auxiliary"
    ):
        scene_spec(
            fashion_scenes, "lraspp_mobilenet_v3_large", "student.kwargs={num_classes: 11, aux_loss: true}"
        )
    with pytest.raises(
        cg.SpecError, match=r"^teachers\[0\].kwargs.aux_loss: lraspp_mobilenet_v3_large has no"
    ):
        lraspp = "{arch: lraspp_mobilenet_v3_large, weight_bits: 4, act_bits: 4}"  # the student's kwargs
        scene_spec(
            fashion_scenes,
            "fcn_resnet50",
            "student.kwargs={num_classes: 11, aux_loss: true}",
            f"teachers=[{lraspp}]",
        )
    with pytest.raises(cg.SpecError, match=r"data.pipeline: device decodes class-labelled images"):
        scene_spec(fashion_scenes, "lraspp_mobilenet_v3_large", "data.pipeline=device")
    with pytest.raises(cg.SpecError, match=r"data.dataset: fashion_mnist holds classification data"):
        cg.load_spec("quickstart", ["student.arch=lraspp_mobilenet_v3_large"])


def test_a_w2a2_segmentation_student_trains_evaluates_exports_and_predicts_masks(tmp_path, fashion_scenes):
    """specs/segmentation_quickstart.yaml in tiny mode: two training processes, resumed by one; eval,
    export and predict on what they trained."""
    sets = [f"data.root={fashion_scenes}", "data.batch_size=8", "data.train_subset=64", "data.eval_subset=16"]
    run, train = train_tiny_example("segmentation_quickstart.yaml", sets, cwd=tmp_path, port=29571)
    assert all(r["loss/kl_student"] > 0 for r in train)
    final = json.loads((run / "final.json").read_text())
    assert set(final["accuracy"]) == {
        f"{m}/{n}" for m in ("miou", "pixacc") for n in ("student", "combined", "teacher0", "teacher1")
    }
    assert final["classes"] == SCENE_CLASSES and final["colours"][1] == [128, 0, 0]  # labelmap.txt's

    table = cli(tmp_path, "eval", str(run))
    assert "mIoU %" in table and "pixel acc. %" in table and "final.json mIoU" in table
    record = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert record["task"] == "segmentation" and record["samples"] == 16
    assert record["miou/student"] == pytest.approx(final["accuracy"]["miou/student"])

    cli(tmp_path, "export", str(run), "--out", "exported", "--format", "all", "--int8-layers", "every")
    manifest = json.loads((tmp_path / "exported" / "manifest.json").read_text())
    onnx = manifest["onnx"]  # exact Q/DQ ONNX, checked per image over all of its pixels
    assert onnx["check_images"] == 8 and onnx["images_within_tolerance"] <= 8  # images, not pixels
    assert onnx["check_source"].startswith("the run's evaluation data")  # 8 of its 16 scenes
    assert onnx["top1_agreement"] > 0.99
    for integer in (manifest["onnx_int8"], manifest["openvino"]):  # the heads' operations written, per pixel
        assert integer["file"] and integer["integer_layers"] > integer["quantized_layers"] / 2
        assert 0 <= integer["top1_agreement"] <= 1
    scene, _ = make_scene(*_items(), 64, seed=3)
    # a photo of another size: resized whole for the model, the mask mapped back onto it
    Image.fromarray(scene.permute(1, 2, 0).numpy()).resize((96, 80)).save(tmp_path / "scene.png")
    answer = json.loads(
        cli(tmp_path, "predict", "exported", "scene.png", "--top", "2", "--masks", "masks", "--json")
    )
    shares = [p["share"] for p in answer[0]["predictions"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    png = Image.open(tmp_path / answer[0]["mask"])  # a colour image of class indices
    assert png.mode == "P" and png.getpalette()[: 3 * 11] == [v for c in voc_palette()[:11] for v in c]
    mask = np.array(png)
    assert mask.shape == (80, 96) and mask.max() < 11
    top = answer[0]["predictions"][0]
    assert top["share"] == pytest.approx((mask == top["index"]).mean(), abs=0.03)


def test_the_auxiliary_head_trains_but_is_not_deployed(tmp_path, fashion_scenes):
    """A run's student saved with its auxiliary head (aux_loss) is loaded and exported without it, its
    main prediction unchanged."""
    from cmtkd_graph.passes.common import AUX, LOGITS
    from safetensors.torch import load_file, save_file

    from cmtkd_graph.inspection import spec_summary
    from cmtkd_graph.spec.io import dump_spec

    spec = scene_spec(
        fashion_scenes,
        "deeplabv3_mobilenet_v3_large",
        "student.kwargs={num_classes: 11, aux_loss: true}",
        "teachers=[]",
        "method=single",
        "distill={}",
    )
    assert "1 CE_S + 0.5 CE_aux (student: auxiliary heads)" in spec_summary(spec)
    system = cg.build_system(spec).eval()
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(dump_spec(spec))
    save_file(system.student.state_dict(), run / "student.safetensors")
    assert any(k.startswith("aux_classifier.") for k in load_file(run / "student.safetensors"))

    student = cg.load_student(run)
    assert not any(k.startswith("aux_classifier.") for k in student.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        trained = system.student(x)
        assert set(trained) >= {LOGITS, AUX}
        torch.testing.assert_close(student(x), trained[LOGITS], rtol=0, atol=0)
    cli(tmp_path, "export", "run", "--out", "exported", "--format", "torch")
    exported = load_file(tmp_path / "exported" / "student.safetensors")
    assert exported and not any(k.startswith("aux_classifier.") for k in exported)


@pytest.mark.parametrize("arch", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_int8_onnx_writes_the_segmentation_heads(arch, tmp_path, fashion_scenes):
    """The heads' operations (ASPP's concatenation, resizing to a size read from a feature map,
    Hardswish, the squeeze-excitation gates, LR-ASPP's sigmoid scale) are written as PyTorch computes
    them (a float student: equal to float rounding); a W2A2 student's quantized convolutions run on
    QLinearConv, calibrated."""
    import onnx

    from cmtkd_graph.deploy.inference import inference_form
    from cmtkd_graph.deploy.onnx_int8 import build_int8_onnx, kernels, session
    from cmtkd_graph.deploy.student import build_student

    scenes_read = build_datasets(scene_spec(fashion_scenes, arch).data).eval
    images = torch.stack([scenes_read[i][0] for i in range(8)])
    for bits, calibration in ((32, None), (2, images)):
        torch.manual_seed(0)
        spec = scene_spec(fashion_scenes, arch, f"student.weight_bits={bits}", f"student.act_bits={bits}")
        student = build_student(spec)  # as export builds it
        model, plan = build_int8_onnx(inference_form(student), tuple(images.shape[1:]), calibration)
        ops = {n.op_type for n in model.graph.node}
        assert {"Resize", "HardSwish", "HardSigmoid", "Mul"} <= ops
        aspp = any(n.op_type == "Concat" and n.attribute[0].i == 1 for n in model.graph.node)  # channels
        assert aspp == arch.startswith("deeplab") and ("Sigmoid" in ops) == arch.startswith("lr")
        path = tmp_path / f"{bits}.onnx"
        path.write_bytes(model.SerializeToString())
        optimized = path.with_suffix(".optimized.onnx")
        (got,) = session(path, optimized=optimized).run(None, {"images": images.numpy()})
        assert got.shape == (8, 11, 64, 64)
        if bits == 32:
            with torch.no_grad():
                expected = student(images).numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        else:
            used = kernels(onnx.load(str(optimized)), list(plan.integer))
            assert sum(k == "QLinearConv" for k in used.values()) > len(plan.integer) / 2


def _items(span: slice = slice(0, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Fashion-MNIST test items (Debian's package)."""
    from cmtkd_graph.data.fashion_mnist import read_fashion_mnist

    items, labels = read_fashion_mnist(None).eval
    return items[span, 0], labels[span]


def test_a_study_of_segmentation_rows_reports_their_metrics(tmp_path, fashion_scenes):
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
            scenes(fashion_scenes),
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


def eager_fcn(bits: int) -> torch.nn.Module:
    """torchvision's FCN-ResNet50 with its auxiliary head (aux_loss), every convolution but the stem and
    the two prediction layers quantized by hand."""
    from .test_compose import EagerQuantConv

    model = torchvision.models.segmentation.fcn_resnet50(num_classes=5, aux_loss=True, weights_backbone=None)
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, torch.nn.Conv2d)
            and name not in ("backbone.conv1", "classifier.4", "aux_classifier.4")
            and bits < 32
        ):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, EagerQuantConv(module, bits))
    return model


STAGES = ["layer1", "layer2", "layer3", "layer4"]
TAPS = {stage: f"backbone.{stage}" for stage in STAGES}  # the system's names of the stages


def eager_segmentation_cmtkd(student, teachers, logits, x):
    """CMT-KD's forward pass for FCN written directly from docs/tasks.md: shared knowledge at the backbone
    stages feeds every teacher's next stage and its heads (the auxiliary head reads layer3's); the heads'
    maps are upsampled to the input."""

    def stem(m):
        b = m.backbone
        return b.maxpool(b.relu(b.bn1(b.conv1(x))))

    def head(module, h):
        return F.interpolate(module(h), size=x.shape[-2:], mode="bilinear", align_corners=False)

    s, student_features = stem(student), {}
    for stage in STAGES:
        s = student_features[TAPS[stage]] = getattr(student.backbone, stage)(s)
    hs, shared = [stem(t) for t in teachers], {}
    for stage in STAGES:
        fs = [getattr(t.backbone, stage)(h) for t, h in zip(teachers, hs, strict=True)]
        w = torch.softmax(logits[TAPS[stage]], 0)
        shared[TAPS[stage]] = sum(w[k] * fs[k] for k in range(len(fs)))
        hs = [shared[TAPS[stage]]] * len(teachers)
    zs = [head(t.classifier, h) for t, h in zip(teachers, hs, strict=True)]
    w = torch.softmax(logits["output"], 0)
    aux = [head(m.aux_classifier, f[TAPS["layer3"]]) for m, f in [(student, student_features)]] + [
        head(t.aux_classifier, shared[TAPS["layer3"]]) for t in teachers
    ]
    combined = sum(w[k] * zs[k] for k in range(len(zs)))
    return head(student.classifier, s), student_features, combined, zs, shared, aux


def test_composed_segmentation_system_equals_eager_cmtkd_values_and_gradients():
    from .test_compose import assert_same_gradients, copy_weights

    torch.manual_seed(0)
    spec = cg.load_spec(
        "quickstart",
        [
            "student.arch=fcn_resnet50",
            "student.kwargs={num_classes: 5, aux_loss: true}",  # the teachers take the student's kwargs
            "teachers=[{weight_bits: 4, act_bits: 4}, {weight_bits: 8, act_bits: 8}]",
            "taps={teachers: auto}",  # the backbone's stages
            "data={dataset: voc, root: unused, image_size: 32}",
        ],
    )
    system = cg.build_system(spec)
    assert list(system.importance()) == [*TAPS.values(), "output"]
    fusion = {
        name: system.teachers.get_submodule(f"fusion.{name.replace('.', '_')}")
        for name in system.importance()
    }
    with torch.no_grad():
        for module in fusion.values():
            module.logits.copy_(torch.randn(2))
    student, teachers = eager_fcn(2), [eager_fcn(4), eager_fcn(8)]
    logits = {name: torch.nn.Parameter(module.logits.detach().clone()) for name, module in fusion.items()}
    copy_weights(system, student, teachers)
    for model in [system, student, *teachers]:  # the heads' dropout: off in both, batch norm as trained
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()

    x = torch.randn(2, 3, 32, 32)
    out = system(x)
    s_logits, s_feats, combined, zs, shared, aux = eager_segmentation_cmtkd(student, teachers, logits, x)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert out.student_logits.shape == (2, 5, 32, 32)
    close(out.student_logits, s_logits)
    close(out.teacher_logits, combined)
    for k in range(2):
        close(out.each_teacher_logits[k], zs[k])
    for tap in TAPS.values():
        close(out.shared_features[tap], shared[tap])
        close(out.student_features[tap], s_feats[tap])
    assert out.student_aux.shape == (2, 5, 32, 32)
    for graph_aux, eager_aux in zip([out.student_aux, *out.each_teacher_aux], aux, strict=True):
        close(graph_aux, eager_aux)

    # the same per-pixel objective through both: identical gradients, importance logits included
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :4] = IGNORE

    def objective(s, c, sh):
        return (
            F.cross_entropy(s, labels, ignore_index=IGNORE)
            + F.kl_div(F.log_softmax(s, 1), F.softmax(c, 1), reduction="batchmean")
            + sum(sh[tap].pow(2).mean() for tap in TAPS.values())
        )

    # the system's auxiliary term: each network's per-pixel cross-entropy on its auxiliary head, summed
    terms = system.losses(out, labels)
    ce = lambda z: F.cross_entropy(z, labels, ignore_index=IGNORE)
    close(terms["aux"], sum(ce(z) for z in aux))

    (objective(out.student_logits, out.teacher_logits, out.shared_features) + terms["aux"]).backward()
    (objective(s_logits, combined, shared) + sum(ce(z) for z in aux)).backward()
    assert assert_same_gradients(system, student, teachers, logits, rtol=1e-4) >= 3 * 166
