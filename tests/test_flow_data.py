"""Optical flow data: the ``.flo`` format byte for byte, FlyingChairs pair folders and their bad input, the
end-point error and outlier rates on hand-computed flows, and the generated ``fashion_flow`` pairs
(exact flow: the second image warped back by it gives the first)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cmtkd_graph.data.fashion_flow import PAIR_SIZE, similarity
from cmtkd_graph.data.flow_files import BadFlowFile, pair_files, read_flo, read_pair, write_flo
from cmtkd_graph.errors import UserError
from cmtkd_graph.tasks.flow import flow_metric_rows, flow_metric_values


def test_flo_bytes_are_the_middlebury_layout(tmp_path):
    flow = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]])
    write_flo(tmp_path / "a.flo", flow)  # u [2, 3] then v [2, 3]
    expected = b"PIEH" + struct.pack("<ii", 3, 2)
    expected += struct.pack("<12f", 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6)  # (u, v) per pixel, by rows
    assert (tmp_path / "a.flo").read_bytes() == expected
    assert torch.equal(read_flo(tmp_path / "a.flo"), flow)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "magic number b'\\x89PNG' where a .flo file has b'PIEH'"),
        (
            b"PIEH" + struct.pack("<ii", 3, 2) + bytes(40),
            "52 bytes where a 3x2 flow has 60; the file is truncated",
        ),
        (b"PIEH" + struct.pack("<ii", 3, 2) + bytes(52), "longer than its header says"),
        (b"PIEH" + struct.pack("<ii", -3, 2), "its header says -3x2 pixels"),
        (b"PIE", "shorter than a .flo header"),
    ],
)
def test_a_bad_flo_file_is_one_line_naming_it(tmp_path, content, says):
    (tmp_path / "bad.flo").write_bytes(content)
    with pytest.raises(BadFlowFile) as err:
        read_flo(tmp_path / "bad.flo")
    assert str(err.value).startswith(str(tmp_path / "bad.flo"))
    assert says in str(err.value) and "\n" not in str(err.value)


def _pair(data, name, first=(8, 6), second=(8, 6), flow=(8, 6)):
    Image.new("RGB", first).save(data / f"{name}_img1.png")
    Image.new("RGB", second).save(data / f"{name}_img2.png")
    write_flo(data / f"{name}_flow.flo", torch.zeros(2, flow[1], flow[0]))


def test_pair_folders_split_by_the_list_and_refuse_bad_pairs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("00001", "00002", "00003"):
        _pair(data, name)
    (tmp_path / "FlyingChairs_train_val.txt").write_text("1\n2\n1\n")
    train, held_out = pair_files(tmp_path)
    assert [p.first.name for p in train] == ["00001_img1.png", "00003_img1.png"]
    assert [p.flow.name for p in held_out] == ["00002_flow.flo"]
    first, second, flow = read_pair(train[0])
    assert first.shape == second.shape == (3, 6, 8) and first.dtype == torch.uint8 and flow.shape == (2, 6, 8)

    (tmp_path / "FlyingChairs_train_val.txt").write_text("1\n2\n")
    with pytest.raises(UserError, match="2 lines for 3 pairs"):
        pair_files(tmp_path)
    (tmp_path / "FlyingChairs_train_val.txt").write_text("1\n2\n3\n")
    with pytest.raises(UserError, match="marks 3; each line is 1"):
        pair_files(tmp_path)
    (tmp_path / "FlyingChairs_train_val.txt").write_text("1\n1\n1\n1\n")

    _pair(data, "00004", second=(8, 5))
    (data / "00005_img1.png").write_bytes((data / "00001_img1.png").read_bytes())
    with pytest.raises(UserError, match=r"00005_img1.png: its pair '00005' has no img2 and no flow file"):
        pair_files(tmp_path)
    (data / "00005_img1.png").unlink()
    pairs, _ = pair_files(tmp_path)
    with pytest.raises(UserError, match=r"00004_img2.png: 8x5 but 00004_img1.png is 8x6; the two images"):
        read_pair(pairs[3])
    _pair(data, "00004", flow=(7, 6))
    with pytest.raises(UserError, match=r"00004_flow.flo: a 7x6 flow for 8x6 images"):
        read_pair(pairs[3])


def test_end_point_error_and_outlier_rates_by_hand():
    target = torch.zeros(2, 2, 2, 2)
    target[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # error 5
    target[0, :, 0, 1] = torch.tensor([0.0, 2.0])  # error 2
    target[1, :, 1, 1] = torch.tensor([0.6, 0.8])  # error 1 (not over 1)
    rows = flow_metric_rows(torch.zeros_like(target), target)
    assert rows.tolist() == [[4.0, 7.0, 2.0, 1.0, 0.0], [4.0, 1.0, 0.0, 0.0, 0.0]]
    values = flow_metric_values(rows.sum(0))
    assert values == pytest.approx({"epe": 1.0, "out1": 25.0, "out3": 12.5, "out5": 0.0})


def test_similarity_turns_about_its_centre():
    m = similarity(90, 2.0, (1.0, -1.0), (10.0, 10.0))
    x, y, _ = (m @ torch.tensor([11.0, 10.0, 1.0], dtype=torch.float64)).tolist()
    # (11, 10) is 1 px right of the centre: turned by 90 degrees (y down: clockwise on screen), twice as far
    assert (x, y) == pytest.approx((10.0 + 1.0, 12.0 - 1.0))
    assert m @ torch.tensor([10.0, 10.0, 1.0], dtype=torch.float64) == pytest.approx(
        torch.tensor([11.0, 9.0, 1.0], dtype=torch.float64)
    )
    assert math.isclose(float(torch.linalg.det(m[:2, :2])), 4.0)


def test_fashion_flow_is_exact_the_second_image_warped_back_is_the_first(fashion_flow):
    root = fashion_flow
    # 300 training and 90 test items, 11 per pair
    train, held_out = pair_files(root)
    assert (len(train), len(held_out)) == (27, 8)
    moved, still = [], []  # per pair, the median over pixels of the mean absolute difference of RGB
    for pair in train[:8]:
        first, second, flow = read_pair(pair)
        assert first.shape == (3, PAIR_SIZE, PAIR_SIZE) and flow.abs().max() > 1.0
        ys, xs = torch.meshgrid(torch.arange(PAIR_SIZE) + 0.5, torch.arange(PAIR_SIZE) + 0.5, indexing="ij")
        to = torch.stack([xs + flow[0], ys + flow[1]], -1) / PAIR_SIZE * 2 - 1
        warped = F.grid_sample(second[None].float(), to[None], align_corners=False)[0]
        inside = (to.abs() < 0.95).all(-1)
        moved.append((warped - first.float()).abs().mean(0)[inside].median())
        still.append((second.float() - first.float()).abs().mean(0)[inside].median())
    # where a point stays visible the exact flow finds it, up to resampling the textures' noise twice
    # (about 7 of 255 here); without the flow, or with u and v swapped, the difference is 2-5 times that
    moved, still = torch.stack(moved).median(), torch.stack(still).median()
    assert moved < 10.0 and moved < 0.5 * still


def test_fashion_flow_is_one_exact_similarity_per_layer(fashion_items):
    """The flow of every layer (the background, each item) is exactly the motion of a similarity with
    the documented limits: a least-squares affine fit leaves no residual, and its linear part is a turn
    and a scale."""
    from cmtkd_graph.data.fashion_flow import BACKGROUND_MOTION, ITEM_MOTION, ITEMS_PER_PAIR, make_pair
    from cmtkd_graph.data.fashion_mnist import read_fashion_mnist

    items = read_fashion_mnist(str(fashion_items)).train[0][: 3 * ITEMS_PER_PAIR, 0]
    ys, xs = torch.meshgrid(torch.arange(PAIR_SIZE) + 0.5, torch.arange(PAIR_SIZE) + 0.5, indexing="ij")
    for pair in range(3):
        _, _, flow, layers = make_pair(items[pair * ITEMS_PER_PAIR : (pair + 1) * ITEMS_PER_PAIR], pair)
        for layer in layers.unique().tolist():
            where = layers == layer
            if where.sum() < 50:  # an item almost hidden: too few pixels to fit
                continue
            points = torch.stack([xs[where], ys[where], torch.ones_like(xs[where])], 1).double()
            moved = points[:, :2] + flow[:, where].T.double()
            fit = torch.linalg.lstsq(points, moved).solution  # [3, 2]: moved = points @ fit
            assert (points @ fit - moved).abs().max() < 1e-3  # float32 flow, otherwise exact
            (a, b), (c, d) = fit[:2].T.tolist()  # x' = a x + b y + ..., y' = c x + d y + ...
            assert a == pytest.approx(d, abs=1e-4) and b == pytest.approx(-c, abs=1e-4)  # a similarity
            angle, scale, _ = BACKGROUND_MOTION if layer == 0 else ITEM_MOTION
            assert abs(math.degrees(math.atan2(c, a))) <= angle + 1e-3
            assert abs(math.hypot(a, c) - 1) <= scale + 1e-4


def test_flow_metrics_leave_out_unknown_flow():
    target = torch.zeros(1, 2, 1, 2)
    target[0, :, 0, 1] = 1e10  # Middlebury's mark of an unknown flow
    rows = flow_metric_rows(torch.zeros_like(target) + 3.0, target)
    assert rows.tolist() == [[1.0, pytest.approx(math.hypot(3, 3)), 1.0, 1.0, 0.0]]
