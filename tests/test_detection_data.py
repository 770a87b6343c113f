"""Detection data: COCO JSON (boxes, polygon and RLE masks, keypoints) and Pascal VOC XML read into
torchvision's target form, their bad input, COCO scores on hand-computed detections, and the generated
``fashion_objects`` scenes (exact boxes, masks and keypoints, read back by the real reader)."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cmtkd_graph.data.detection_files import (
    DetectionFileWarning,
    coco_ground_truth,
    coco_scores,
    decode_mask,
    read_coco,
    read_voc_boxes,
)
from cmtkd_graph.errors import UserError


def _coco(tmp_path, annotations, categories=None, images=None):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 10)).save(tmp_path / name)
    data = {
        "images": images or [{"id": 7, "file_name": "a.png", "width": 20, "height": 10},
                             {"id": 9, "file_name": "b.png", "width": 20, "height": 10}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog",
                                     "keypoints": ["nose", "tail"]}],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes_masks_keypoints_become_torchvision_targets(tmp_path):
    square = [[2, 2, 6, 2, 6, 6, 2, 6]]  # a polygon: pixels 2..5 in both axes, 16 pixels
    rle = {"size": [10, 20], "counts": [10 * 10, 10 * 3, 10 * 7]}  # uncompressed RLE: columns 10..12 set
    path = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 7, "category_id": 17, "bbox": [2, 2, 4, 4], "segmentation": square,
             "keypoints": [3, 3, 2, 5, 5, 0], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [10, 0, 3, 10], "segmentation": rle,
             "iscrowd": 1},
        ],
    )  # fmt: skip
    data = read_coco(path, tmp_path)
    assert data.classes == ["background", "cat", "dog"] and data.category_ids == [3, 17]
    assert data.keypoint_names == ["nose", "tail"]
    target = data.target(0, with_crowd=True)  # for scoring; training targets leave the crowd out
    assert data.target(0)["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0]]
    assert target["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0], [10.0, 0.0, 13.0, 10.0]]
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [False, True]
    assert target["masks"].shape == (2, 10, 20) and target["masks"].dtype == torch.uint8
    assert target["masks"][0].sum() == 16 and target["masks"][0, 2:6, 2:6].all()
    assert target["masks"][1].sum() == 30 and target["masks"][1, :, 10:13].all()
    assert target["keypoints"].tolist() == [[[3, 3, 2], [5, 5, 0]], [[0, 0, 0], [0, 0, 0]]]
    empty = data.target(1)  # an image without objects: empty targets of the right shapes
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 10, 20)
    assert empty["keypoints"].shape == (0, 2, 3)

    only_dogs = read_coco(path, tmp_path, classes=["dog", "cat"])  # the spec's order decides the labels
    assert only_dogs.target(0, with_crowd=True)["labels"].tolist() == [1, 2]
    with pytest.warns(DetectionFileWarning, match=r"1 object\(s\) of categories data.classes leaves out"):
        dogs = read_coco(path, tmp_path, classes=["dog"])  # a subset: the cat is left out, counted
    assert dogs.classes == ["background", "dog"] and dogs.target(0, with_crowd=True)["labels"].tolist() == [1]

    box_only = {"id": 3, "image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2], "segmentation": []}
    data = read_coco(_coco(tmp_path, [box_only, {**box_only, "id": 4, "segmentation": square}]), tmp_path)
    masks = data.target(1)["masks"]  # a box-only object in a file with masks: an empty mask
    assert masks.shape == (2, 10, 20) and masks[0].sum() == 0 and masks[1].sum() == 16


def test_coco_bad_input_is_one_line_naming_the_file(tmp_path):
    box = {"id": 5, "image_id": 7, "category_id": 3, "bbox": [1, 1, 4, 4]}
    path = _coco(tmp_path, [{**box, "bbox": [15, 2, 8, 4]}])  # to x = 23 in a 20 px wide image
    with pytest.raises(
        UserError, match=r"instances.json: annotation 5's box \(15, 2, 23, 6\) reaches outside"
    ):
        read_coco(path, tmp_path)
    path = _coco(tmp_path, [{**box, "category_id": 4}])
    with pytest.raises(UserError, match=r"annotation 5 has category 4, which categories lacks \(ids 3, 17\)"):
        read_coco(path, tmp_path)
    with pytest.raises(UserError, match=r"data.classes names 'bird', not a category of this file"):
        read_coco(_coco(tmp_path, [box]), tmp_path, classes=["bird"])
    path = _coco(tmp_path, [box], images=[{"id": 7, "file_name": "gone.png", "width": 20, "height": 10}])
    with pytest.raises(UserError, match=r"names 1 image\(s\) not on disk, e.g. .*gone.png"):
        read_coco(path, tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match=r"broken.json: not a JSON file"):
        read_coco(tmp_path / "broken.json", tmp_path)
    for bad, says in (
        ({k: v for k, v in box.items() if k != "bbox"}, "annotation 5: no 'bbox' field"),
        ({**box, "bbox": [1, "two", 3, 4]}, "annotation 5: could not convert string to float"),
        (
            {**box, "category_id": 17, "keypoints": [1, 2, 2]},
            "annotation 5: 3 keypoint values for 2 keypoints",
        ),
    ):
        with pytest.raises(UserError, match=re.escape(says)) as err:
            read_coco(_coco(tmp_path, [bad]), tmp_path)
        assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "instances.json"))
    (tmp_path / "partial.json").write_text('{"images": []}')
    with pytest.raises(UserError, match=r"partial.json: no annotations, categories list"):
        read_coco(tmp_path / "partial.json", tmp_path)


def test_coco_zero_area_boxes_are_skipped_and_counted_overhangs_clamped(tmp_path):
    path = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 4, 0, 3]},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [-0.5, 1, 20.8, 9.5]},  # rounding overhang
        ],
    )
    with pytest.warns(
        DetectionFileWarning,
        match=r"instances.json: 1 box\(es\) of zero width or height skipped \(annotations 1\)",
    ):
        data = read_coco(path, tmp_path)
    assert data.skipped_boxes == 1
    assert data.target(0)["boxes"].tolist() == [[0.0, 1.0, 20.0, 10.0]]


def _voc(tmp_path, objects):
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10)).save(tmp_path / "JPEGImages" / "x.jpg")
    (tmp_path / "ImageSets/Main/train.txt").write_text("x\n")
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects
    )
    (tmp_path / "Annotations/x.xml").write_text(
        f"<annotation><filename>x.jpg</filename><size><width>20</width><height>10</height><depth>3</depth>"
        f"</size>{body}</annotation>"
    )


def test_voc_boxes_start_at_pixel_one_and_difficult_is_kept_apart(tmp_path):
    _voc(tmp_path, [("dog", 0, (1, 1, 5, 4)), ("cat", 1, (10, 2, 20, 10))])
    data = read_voc_boxes(tmp_path, "train")
    assert data.classes == ["background", "dog", "cat"]
    assert data.target(0)["labels"].tolist() == [1]  # training targets: the difficult cat left out
    target = data.target(0, with_crowd=True)
    assert target["boxes"].tolist() == [[0.0, 0.0, 5.0, 4.0], [9.0, 1.0, 20.0, 10.0]]
    assert target["labels"].tolist() == [1, 2] and target["iscrowd"].tolist() == [False, True]
    with pytest.warns(DetectionFileWarning, match=r"1 object\(s\) of categories data.classes leaves out"):
        cats = read_voc_boxes(tmp_path, "train", classes=["cat"])  # the dog is left out, counted
    assert cats.target(0, with_crowd=True)["labels"].tolist() == [1]
    _voc(tmp_path, [("dog", 0, (1, 1, "5px", 4))])
    with pytest.raises(UserError, match=r"x.xml: <bndbox><xmax> is '5px', not a number"):
        read_voc_boxes(tmp_path, "train")
    xml = tmp_path / "Annotations/x.xml"
    xml.write_text(xml.read_text().replace("<bndbox>", "<box>").replace("</bndbox>", "</box>"))
    with pytest.raises(UserError, match=r"x.xml: object 0 \(dog\) has no <bndbox>"):
        read_voc_boxes(tmp_path, "train")
    _voc(tmp_path, [("dog", 0, (1, 1, 25, 4))])
    with pytest.raises(
        UserError,
        match=r"x.xml: object 0 \(dog\)'s box \(0, 0, 25, 4\) reaches outside its image x.jpg \(20x10\)",
    ):
        read_voc_boxes(tmp_path, "train")


def test_coco_scores_on_hand_computed_detections():
    truth = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    perfect = coco_scores(truth, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}])
    assert perfect["map"] == pytest.approx(100.0) and perfect["ap_small"] == pytest.approx(100.0)
    assert perfect["ap_medium"] == -1.0  # no medium objects: COCOeval has nothing to score
    # IoU 62 / 100 = 0.62: a hit at the thresholds 0.50, 0.55, 0.60 of ten, a miss at 0.65..0.95
    shifted = coco_scores(truth, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6.2], "score": 0.9}])
    assert shifted["map"] == pytest.approx(30.0) and shifted["ap50"] == pytest.approx(100.0)
    assert shifted["ap75"] == pytest.approx(0.0)
    # a false positive scored above the hit: precision 1/2 at recall 1, interpolated over 101 points
    two = [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.95},
           {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]  # fmt: skip
    assert coco_scores(truth, two)["map"] == pytest.approx(50.0)
    assert coco_scores(truth, [])["map"] == 0.0


def test_fashion_objects_annotations_are_exact_and_score_100_against_themselves(fashion_objects):
    root = fashion_objects
    train = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 100  # 300 training items, 3 per scene
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the generator writes no box the reader would skip
        data = read_coco(root / "annotations" / "instances_val.json", root / "val")
    assert len(data.images) == 30 and data.classes[1] == "T-shirt/top" and len(data.classes) == 11
    assert data.keypoint_names == ["top", "right", "bottom", "left"]
    objects = 0
    for index in range(len(data.images)):
        target = data.target(index)
        masks = target["masks"].bool()
        assert masks.sum(0).max() <= 1  # an object's pixels are the ones it shows: no overlaps
        for mask, box, points in zip(masks, target["boxes"], target["keypoints"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (points[:, 2] == 2).all()
            assert points[0, 1] == ys.min() and points[2, 1] == ys.max()  # top, bottom (pixel indices)
            assert points[1, 0] == xs.max() and points[3, 0] == xs.min()  # right, left
            assert all(mask[int(y), int(x)] for x, y, _ in points.tolist())  # each on a pixel of the object
            objects += 1
        image = torch.tensor(np.array(Image.open(data.images[index].path)), dtype=torch.float32)
        if masks.any():  # the objects are brighter than the dark background around them
            assert image[masks.any(0)].mean() > 3 * image[~masks.any(0)].mean()
    assert objects > 60  # about three per scene, a few hidden

    truth = coco_ground_truth(data)
    as_detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "segmentation": a["segmentation"], "score": 1.0}
        for a in truth["annotations"]
    ]  # fmt: skip
    assert coco_scores(truth, as_detections)["map"] == pytest.approx(100.0)
    assert coco_scores(truth, as_detections, "segm")["map"] == pytest.approx(100.0)
    points = [
        {**d, "keypoints": a["keypoints"]} for d, a in zip(as_detections, truth["annotations"], strict=True)
    ]
    assert coco_scores(truth, points, "keypoints")["map"] == pytest.approx(
        100.0
    )  # 4 keypoints, not COCO's 17
    with pytest.raises(ValueError, match="images the ground truth does not have"):
        coco_scores(truth, [{**as_detections[0], "image_id": 10**6}])
    written = json.loads((root / "annotations" / "instances_val.json").read_text())
    first = written["annotations"][0]
    assert decode_mask(first["segmentation"], 128, 128).sum() == first["area"]
