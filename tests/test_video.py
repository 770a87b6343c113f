"""`task: video`: the nine torchvision video builders rewritten, quantized and composed, features over time
and space, clips in both layouts (PyAV-decoded files, frame folders), the generated moving clips, a
composed r3d_18 system equal to an eager CMT-KD, and a W2A2 student trained in two processes, resumed,
evaluated, exported and asked for the classes of clips."""

from __future__ import annotations

import itertools
import json
import re
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph.data import CorruptImageError, CorruptImageWarning, build_datasets, build_loaders
from cmtkd_graph.data.clips import ShortClipError
from cmtkd_graph.data.moving import DIRECTIONS, ITEM, STORED_FRAMES, make_clip
from cmtkd_graph.data.seeding import SeededSamples
from cmtkd_graph.errors import UserError
from cmtkd_graph.inspection import support
from cmtkd_graph.losses import FitNetAdapter, attention_loss, attention_map
from cmtkd_graph.models.facts import family_of
from cmtkd_graph.quantizers import QuantConv3d, QuantLinear
from cmtkd_graph.registry import TASKS
from cmtkd_graph.runtime.layout import channels_last_module, channels_last_tensor
from cmtkd_graph.spec import DataSpec
from cmtkd_graph.spec.io import validate_spec

from .conftest import REPO, cli, train_tiny_example

MODELS_PAGE = Path(__file__).resolve().parents[1] / support.PAGE
BUILDERS = {  # builder -> (frames, side) it runs on: MViT's position embeddings and S3D's pooling fix theirs
    "r3d_18": (8, 32),
    "mc3_18": (8, 32),
    "r2plus1d_18": (8, 32),
    "s3d": (16, 224),
    "mvit_v1_b": (16, 224),
    "mvit_v2_s": (16, 224),
    "swin3d_t": (8, 32),
    "swin3d_s": (8, 32),
    "swin3d_b": (8, 32),
}


def clip_spec(arch: str, frames: int = 8, size: int = 32, root: str = "unused", **extra) -> cg.Spec:
    return validate_spec(
        {
            "name": arch,
            "student": {"arch": arch, "kwargs": {"num_classes": 8}, "weight_bits": 2, "act_bits": 2},
            "teachers": [{"weight_bits": 4, "act_bits": 4}, {"weight_bits": 8, "act_bits": 8}],
            "taps": {"teachers": "auto"},
            "data": {"dataset": "frame_folders", "root": root, "frames": frames, "image_size": size},
            **extra,
        }
    )


@pytest.mark.parametrize("arch", ["r2plus1d_18", "s3d"])
def test_int8_onnx_writes_3d_convolutions_pooling_and_means(arch, tmp_path):
    """The inference form folds BatchNorm3d into integer-weight 3-D convolutions; the int8 writer writes
    them, 3-D max and average pooling, S3D's branch concatenation and its mean over time and space: for a
    float student equal to PyTorch to float rounding, and a W2A2 student's quantized convolutions on
    QLinearConv, calibrated."""
    import onnx

    from cmtkd_graph.deploy.inference import IntegerWeightConv3d, inference_form
    from cmtkd_graph.deploy.onnx_int8 import build_int8_onnx, kernels, session
    from cmtkd_graph.deploy.student import build_student

    frames, side = BUILDERS[arch]
    x = torch.rand(
        1 if arch == "s3d" else 4, 3, frames, side, side, generator=torch.Generator().manual_seed(0)
    )
    for bits in (32, 2):
        torch.manual_seed(0)
        spec = clip_spec(arch, frames, side).model_copy(deep=True)
        spec.student.weight_bits = spec.student.act_bits = bits
        student = build_student(spec)
        form = inference_form(student)
        assert not any(isinstance(m, nn.BatchNorm3d) for m in form.modules())  # folded
        model, plan = build_int8_onnx(form, tuple(x.shape[1:]), None if bits == 32 else x)
        path = tmp_path / f"{bits}.onnx"
        path.write_bytes(model.SerializeToString())
        optimized = path.with_suffix(".optimized.onnx")
        (got,) = session(path, optimized=optimized).run(None, {"images": x.numpy()})
        if bits == 32:
            with torch.no_grad():
                expected = student(x).numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        else:
            assert sum(isinstance(m, IntegerWeightConv3d) for m in form.modules()) == len(plan.integer)
            used = kernels(onnx.load(str(optimized)), list(plan.integer))
            assert list(used.values()) == ["QLinearConv"] * len(plan.integer)


# ---------------------------------------------------------------- the nine builders


@pytest.mark.parametrize("arch", BUILDERS)
def test_every_video_builder_is_quantized_and_composed_at_its_stages(arch):
    """W2A2 student, W4A4 and W8A8 teachers fused at the auto taps: forward and backward (meta device)."""
    assert set(TASKS.get("video").model_names()) == set(BUILDERS)
    spec = clip_spec(arch, *BUILDERS[arch])
    assert spec.resolved_task == "video" and spec.data.input_shape() == (
        3,
        *BUILDERS[arch][:1],
        *BUILDERS[arch][1:] * 2,
    )
    system = cg.build_system(spec, device="meta", load=False)
    rule = family_of(arch).auto_taps  # MViT: blocks at 1/4, 1/2, 3/4 and all of its 16
    taps = rule.names if hasattr(rule, "names") else ("blocks.3", "blocks.7", "blocks.11", "blocks.15")
    assert list(system.importance()) == [*taps, "output"]
    layers = [m for m in system.student.modules() if isinstance(m, nn.Conv3d | nn.Linear)]
    quantized = [m for m in layers if isinstance(m, QuantConv3d | QuantLinear)]
    assert not isinstance(layers[0], QuantConv3d)  # the stem stays float (the first-layer rule)
    assert len(quantized) > len(layers) / 2 and all(m.weight_quantizer.bits == 2 for m in quantized)
    if arch.startswith("swin3d"):  # the window attention's projections, run functionally by torchvision
        attention = system.student.get_submodule("features.0.0.attn")
        assert type(attention).__name__ == "QuantShiftedWindowAttention3d"
        assert attention.qkv.weight_quantizer.bits == 2 and attention.proj.input_quantizer.signed
    row = support.read_page(MODELS_PAGE.read_text())[arch]  # docs/models.md says what this build shows
    assert row.structure() == support.structure(spec, system)
    x = torch.empty(2, *spec.data.input_shape(), device="meta")
    system.eval()  # meta: batch norm's training kernel is slow Python there; the graph is the same
    out = system(x)
    assert out.student_logits.shape == out.teacher_logits.shape == (2, 8)
    for tap in system.networks[1].taps:  # maps [B, C, T, H, W] (Video Swin's moved to channels first)
        feature = out.shared_features[tap.name]
        assert feature.shape[1:] == tap.shape and (len(tap.shape) == 4 or arch.startswith("mvit"))
    system.losses(out, torch.zeros(2, dtype=torch.long, device="meta"))["total"].backward()
    fusion = next(m for m in system.teachers.modules() if isinstance(m, cg.fusion.ImportanceFusion))
    assert fusion.logits.grad is not None


def test_a_video_builder_with_a_fixed_or_least_input_size_says_so_in_one_line():
    with pytest.raises(UserError, match="mvit_v2_s runs on clips of 16x224x224 only") as err:
        clip_spec("mvit_v2_s", 8, 32)
    assert "set data.frames: 16 and data.image_size: 224" in str(err.value)
    with pytest.raises(UserError) as err:  # S3D's last pooling: at least 2x7x7 left of the clip
        cg.build_system(clip_spec("s3d", 8, 32), device="meta", load=False)
    assert "smaller than kernel size" in str(err.value) and "data.image_size" in str(err.value)
    with pytest.raises(UserError, match=r"surgery cifar_stem: .* first layer is a Conv3d"):
        cg.build_system(clip_spec("r3d_18", surgery=[{"name": "cifar_stem"}]), device="meta", load=False)


def test_features_over_time_and_space():
    """Attention maps spread over T x H x W; sizes matched by 3-D pooling; FitNet adapts with Conv3d."""
    torch.manual_seed(0)
    feature = torch.randn(2, 4, 3, 5, 6)
    energy = feature.pow(2).mean(1).flatten(1)
    torch.testing.assert_close(attention_map(feature), energy / energy.norm(dim=1, keepdim=True))
    small = torch.randn(2, 7, 3, 5, 6)
    big = torch.randn(2, 4, 6, 10, 12)
    pooled = F.adaptive_avg_pool3d(big, (3, 5, 6))
    expected = (attention_map(pooled) - attention_map(small)).pow(2).mean()
    torch.testing.assert_close(attention_loss(big, small), expected)
    adapter = FitNetAdapter((7, 3, 5, 6), (4, 3, 5, 6))
    assert isinstance(adapter.regressor[0], nn.Conv3d) and adapter(small).shape == (2, 4, 3, 5, 6)


def test_channels_last_layout_of_a_video_network():
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=4).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    expected = model(x)
    channels_last_module(model)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert channels_last_tensor(x).is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(model(channels_last_tensor(x)), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- data


def test_moving_clips_are_made_once_as_frame_folders_and_read_back_exactly(moving_fashion):
    names = list(DIRECTIONS)
    assert sorted(p.name for p in (moving_fashion / "train").iterdir()) == sorted(names)
    assert sum(1 for _ in (moving_fashion / "train").glob("*/*")) == 150
    assert sum(1 for _ in (moving_fashion / "val").glob("*/*")) == 45
    clip = moving_fashion / "train" / names[3] / "000003"  # clip i moves in direction i mod 8
    frames = sorted(clip.iterdir())
    assert [p.name for p in frames] == [f"{t:02d}.png" for t in range(STORED_FRAMES)]
    stored = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in frames])
    spec = DataSpec(dataset="moving_fashion", root=str(moving_fashion), frames=12, normalize=False)
    bundle = build_datasets(spec)
    assert bundle.classes == sorted(names) and bundle.input_shape == (3, 12, 32, 32)
    index = next(i for i, (path, _) in enumerate(bundle.train_eval.samples) if path == str(clip))
    x, label = bundle.train_eval[index]
    assert bundle.classes[label] == names[3]
    torch.testing.assert_close(x, stored.permute(1, 0, 2, 3).float() / 255)  # PNG: exact

    # the direction is the label: a lone bright square moves by the direction's step every frame
    square = torch.ones(ITEM, ITEM)
    for number, (step_r, step_c) in enumerate(DIRECTIONS.values()):
        clip_frames = make_clip(torch.zeros(ITEM, ITEM), square, number, seed=number).float()
        corners = [(f.mean(0) > 60).nonzero().min(0).values for f in clip_frames]
        moves = {tuple((b - a).tolist()) for a, b in itertools.pairwise(corners)}
        assert moves == {(step_r, step_c)}


def write_mp4(path: Path, frames: torch.Tensor, rate: int = 10) -> None:
    """uint8 frames [T, 3, H, W] as an MPEG-4 file (PyAV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[3], frames.shape[2], "yuv420p"
        for frame in frames.permute(0, 2, 3, 1).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def numbered_frames(count: int) -> torch.Tensor:
    """Frames whose brightness tells their number (20 x t), to see which frames a sample took."""
    return torch.arange(count, dtype=torch.uint8).mul(20).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).clone()


def test_clip_files_and_frame_folders_take_the_same_windows(tmp_path):
    for split in ("train", "val"):
        for label, suffix, name in (("a", "mp4", "img_{:05d}.jpg"), ("b", "mkv", "{}.png")):
            # MP4 headers count their frames, Matroska's do not; ffmpeg's %05d and %d frame names
            write_mp4(tmp_path / "files" / split / label / f"clip.{suffix}", numbered_frames(12))
            folder = tmp_path / "frames" / split / label / "clip"
            folder.mkdir(parents=True)
            for t, frame in enumerate(numbered_frames(12)):
                Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / name.format(t + 1))
    starts_of = {}
    for dataset, layout in (("clip_folders", "files"), ("frame_folders", "frames")):
        spec = DataSpec(
            dataset=dataset, root=str(tmp_path / layout), frames=4, frame_stride=2, normalize=False
        )
        bundle = build_datasets(spec)
        assert bundle.input_shape == (3, 4, 224, 224)  # any size: resized like an image folder's images
        for index in (0, 1):
            x, label = bundle.eval[index]
            numbers = (x.mean(dim=(0, 2, 3)) * 255 / 20).round().tolist()
            assert label == index and numbers == [2, 4, 6, 8]  # the middle window, every 2nd frame
        starts = set()
        for epoch in range(6):  # training: a random start, the same for a (seed, epoch, index)
            seeded = SeededSamples(bundle.train, seed=0)
            seeded.set_epoch(epoch)
            first = (seeded[0][0].mean(dim=(0, 2, 3)) * 255 / 20).round()
            torch.testing.assert_close(seeded[0][0], seeded[0][0])
            assert (first.diff() == 2).all()
            starts.add(int(first[0]))
        assert len(starts) > 1 and starts <= {0, 1, 2, 3, 4, 5}
        starts_of[layout] = starts

        long = DataSpec(dataset=dataset, root=str(tmp_path / layout), frames=7, frame_stride=2)
        with pytest.raises(ShortClipError, match=r"clip(\.mp4)?: 12 frames; a sample needs 13"):
            build_datasets(long).eval[0]
    assert starts_of["files"] == starts_of["frames"]  # the same jitter, whichever layout


def test_bad_clips_are_one_line_or_skipped_and_counted(tmp_path, monkeypatch):
    for split in ("train", "val"):
        write_mp4(tmp_path / split / "a" / "good.mp4", numbered_frames(10))
    broken = tmp_path / "train" / "a" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    spec = dict(dataset="clip_folders", root=str(tmp_path), frames=4, image_size=32)
    bundle = build_datasets(DataSpec(**spec))
    with pytest.raises(CorruptImageError, match=r"unreadable clip .*broken\.mp4"):
        bundle.train[0]
    workers = DataSpec(**spec, num_workers=1)  # raised in a DataLoader worker: still one line
    loader, _ = build_loaders(build_datasets(workers), workers, train_batch_size=2, eval_batch_size=2, seed=0)
    with pytest.raises(CorruptImageError) as err:
        list(loader)
    assert len(str(err.value).splitlines()) == 1 and "unreadable clip" in str(err.value)
    del loader, err
    skipping = build_datasets(DataSpec(**spec, corrupt_images="skip"))
    loader, _ = build_loaders(skipping, DataSpec(**spec), train_batch_size=2, eval_batch_size=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        ((x, _),) = list(loader)
    assert x.shape == (1, 3, 4, 32, 32) and skipping.skipped_images() == 1
    with pytest.raises(ValueError, match=r"data\.frames/frame_stride: for clip datasets"):
        DataSpec(dataset="imagefolder", root=str(tmp_path), frames=4)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed: one line naming the extra
    with pytest.raises(UserError, match=r"pip install 'cmtkd-graph\[video\]'"):
        build_datasets(DataSpec(**spec))
    monkeypatch.undo()
    resnet = {"arch": "resnet18", "weight_bits": 2, "act_bits": 2}
    with pytest.raises(UserError, match="moving_fashion holds video data; the spec's task is classification"):
        validate_spec({"name": "x", "student": resnet, "data": {"dataset": "moving_fashion"}})


# ---------------------------------------------------------------- against an eager CMT-KD


def eager_r3d(bits: int) -> nn.Module:
    """torchvision's r3d_18 with every convolution but the stem's quantized by hand (fc stays float)."""
    from .test_compose import EagerQuantConv

    model = torchvision.models.video.r3d_18(num_classes=5)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv3d) and name != "stem.0":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, EagerQuantConv(module, bits))
    return model


STAGES = ["layer1", "layer2", "layer3", "layer4"]


def eager_video_cmtkd(student, teachers, logits, x):
    """CMT-KD's forward pass for clips: shared knowledge [B, C, T, H, W] at the four stages feeds every
    teacher's next stage; the combined teacher is the importance-weighted sum of the teachers' logits."""

    def head(m, h):
        return m.fc(torch.flatten(m.avgpool(h), 1))

    s, student_features = student.stem(x), {}
    for stage in STAGES:
        s = student_features[stage] = getattr(student, stage)(s)
    hs, shared = [t.stem(x) for t in teachers], {}
    for stage in STAGES:
        fs = [getattr(t, stage)(h) for t, h in zip(teachers, hs, strict=True)]
        w = torch.softmax(logits[stage], 0)
        shared[stage] = sum(w[k] * fs[k] for k in range(len(fs)))
        hs = [shared[stage]] * len(teachers)
    zs = [head(t, h) for t, h in zip(teachers, hs, strict=True)]
    w = torch.softmax(logits["output"], 0)
    return head(student, s), student_features, sum(w[k] * zs[k] for k in range(len(zs))), zs, shared


def test_composed_video_system_equals_eager_cmtkd_values_and_gradients():
    from .test_compose import assert_same_gradients, copy_weights

    torch.manual_seed(0)
    spec = clip_spec(
        "r3d_18",
        4,
        24,  # layer4's maps 2x2: no single-pixel layer (tests/test_quantizers.py has that one)
        student={"arch": "r3d_18", "kwargs": {"num_classes": 5}, "weight_bits": 2, "act_bits": 2},
    )
    system = cg.build_system(spec)
    assert list(system.importance()) == [*STAGES, "output"]
    fusion = {name: system.teachers.get_submodule(f"fusion.{name}") for name in system.importance()}
    with torch.no_grad():
        for module in fusion.values():
            module.logits.copy_(torch.randn(2))
    student, teachers = eager_r3d(2), [eager_r3d(4), eager_r3d(8)]
    logits = {name: nn.Parameter(module.logits.detach().clone()) for name, module in fusion.items()}
    copy_weights(system, student, teachers)

    x = torch.randn(2, 3, 4, 24, 24)
    out = system(x)
    s_logits, s_feats, combined, zs, shared = eager_video_cmtkd(student, teachers, logits, x)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    close(out.student_logits, s_logits)
    close(out.teacher_logits, combined)
    for k in range(2):
        close(out.each_teacher_logits[k], zs[k])
    for stage in STAGES:
        assert shared[stage].dim() == 5
        close(out.shared_features[stage], shared[stage])
        close(out.student_features[stage], s_feats[stage])

    labels = torch.randint(0, 5, (2,))

    def objective(s, c, sh, sf):
        return (
            F.cross_entropy(s, labels)
            + F.kl_div(F.log_softmax(s, 1), F.softmax(c, 1), reduction="batchmean")
            + sum(attention_loss(sh[stage], sf[stage]) for stage in STAGES)
        )

    objective(out.student_logits, out.teacher_logits, out.shared_features, out.student_features).backward()
    objective(s_logits, combined, shared, s_feats).backward()
    assert assert_same_gradients(system, student, teachers, logits, rtol=1e-4) >= 3 * 60


# ---------------------------------------------------------------- every verb


def test_taps_and_inspect_show_a_video_model(tmp_path):
    table = cli(tmp_path, "taps", "r3d_18", "--input-size", "32", "--frames", "8")
    assert table.startswith("r3d_18 at 3x8x32x32")
    assert re.search(r"\*\s+layer4\.1\.relu\s+ReLU\s+\[512, 1, 2, 2\]", table)  # an auto tap, [C, T, H, W]
    spec = str(REPO / "specs" / "video_quickstart.yaml")
    summary = cli(tmp_path, "inspect", spec, "--set", "data.root=unused")
    assert "input 2x3x8x32x32" in summary and "W2A2: 19 QuantConv3d" in summary
    assert "stem.0 Conv3d (first layer kept full precision)" in summary


def test_a_w2a2_video_student_trains_evaluates_exports_and_predicts_clips(tmp_path, moving_fashion):
    """specs/video_quickstart.yaml in tiny mode: two training processes, resumed by one; eval, export and
    predict (a frame folder and a video file) on what they trained."""
    sets = [
        f"data.root={moving_fashion}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.train_subset=16",
        "data.eval_subset=8",
        "data.image_size=16",
        "data.frames=4",
    ]
    run, train = train_tiny_example("video_quickstart.yaml", sets, cwd=tmp_path, port=29581)
    assert all(r["loss/feature"] > 0 for r in train)
    final = json.loads((run / "final.json").read_text())
    assert set(final["accuracy"]) == {
        f"{m}/{n}" for m in ("acc1", "acc5") for n in ("student", "combined", "teacher0", "teacher1")
    }

    table = cli(tmp_path, "eval", str(run))
    assert "top-1 %" in table
    record = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert record["task"] == "video" and record["samples"] == 8
    assert record["acc1/student"] == pytest.approx(final["accuracy"]["acc1/student"])

    cli(tmp_path, "export", str(run), "--out", "exported", "--format", "all", "--int8-layers", "every")
    manifest = json.loads((tmp_path / "exported" / "manifest.json").read_text())
    assert manifest["onnx"]["top1_agreement"] > 0.99  # the exact Q/DQ ONNX, on clips
    assert any("Conv3d" in layer["type"] for layer in manifest["layers"])
    for integer in (manifest["onnx_int8"], manifest["openvino"]):  # 3-D convolutions on int8 kernels
        assert integer["file"] and integer["integer_layers"] > integer["quantized_layers"] / 2
        assert integer["check_images"] > 0 and 0 <= integer["top1_agreement"] <= 1

    folder = moving_fashion / "val" / "left" / "000004"
    frames = torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in sorted(folder.iterdir())]
    )
    write_mp4(tmp_path / "left.mp4", frames)
    answer = json.loads(cli(tmp_path, "predict", "exported", str(folder), "left.mp4", "--top", "3", "--json"))
    assert [a["clip"] for a in answer] == [str(folder), "left.mp4"]
    for clip in answer:
        probabilities = [p["probability"] for p in clip["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert {p["class"] for p in clip["predictions"]} <= set(DIRECTIONS)
