"""Video clips in the two layouts users have, decoded on access:

* ``clip_folders``: class folders of video files, ``root/train/<class>/<clip>.mp4`` (``.avi``, ``.mkv``,
  ``.webm``, ``.mov``, ``.m4v``), decoded with PyAV (FFmpeg; ``pip install 'cmtkd-graph[video]'``);
* ``frame_folders``: class folders of frame folders, ``root/train/<class>/<clip>/<frame images>``, the
  frames in file-name order with numbers compared as numbers (the UCF-101 frames layout, and what
  ``ffmpeg -i clip.mp4 %05d.jpg`` or ``%d.jpg`` writes).

Evaluation clips sit in ``root/val/`` (or ``test/``, or ``data.eval_split``) alike. A sample is T frames
(``data.frames``) taken every s-th frame (``data.frame_stride``): training clips start at a random frame
(temporal jitter, seeded like every augmentation), evaluation clips take the middle window. The frames of
one clip share one spatial augmentation (``tv_tensors.Video``); the model sees [3, T, H, W].

A clip with fewer than (T - 1) * s + 1 frames stops the run with one line naming it (`ShortClipError`,
never skipped: lower ``data.frames``/``frame_stride`` or remove the clip); a clip FFmpeg or PIL cannot
decode is a `CorruptImageError` (or skipped and counted with ``data.corrupt_images: skip``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.imagefolder import (
    CorruptImageError,
    ImageFiles,
    Sample,
    balanced_first,
    check_same_classes,
    find_classes,
    image_paths,
    pick_eval_split,
)
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.data.transforms import build_clip_transforms
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class ShortClipError(CorruptImageError):
    """A clip with fewer frames than one sample needs. One line in the main process, never skipped."""


class Clips(ImageFiles):
    """(clip [3, T, H, W], class index) pairs: T frames at ``stride`` of each sample's clip, decoded by
    ``read_frames(path, wanted)``, then ``transform``-ed as one ``tv_tensors.Video``."""

    noun = "clip"

    def __init__(
        self,
        samples: list[Sample],
        classes: list[str],
        transform: Callable | None,
        corrupt_images: Literal["error", "skip"] = "error",
        *,
        frames: int,
        stride: int,
        jitter: bool,
        read_frames: Callable[[str, Callable[[int, str], range]], torch.Tensor],
    ):
        super().__init__(samples, classes, transform, corrupt_images)
        self.frames, self.stride, self.jitter, self.read_frames = frames, stride, jitter, read_frames

    def decode(self, index: int, path: str) -> Any:
        """uint8 frames [T, 3, H, W] of sample ``index``; None when unreadable and skipped."""
        try:
            return self.read_frames(path, self.window)
        except ShortClipError:
            raise
        except Exception as e:  # FFmpeg and PIL report damaged files with many exception types
            return self.unreadable(index, path, e)

    def window(self, available: int, path: str = "") -> range:
        """The frame indices of one sample of a clip of ``available`` frames."""
        return sample_window(available, path, frames=self.frames, stride=self.stride, jitter=self.jitter)


def sample_window(available: int, path: str, *, frames: int, stride: int, jitter: bool) -> range:
    """The indices of ``frames`` frames ``stride`` apart in a clip of ``available`` frames: from a random
    start (``jitter``; torch's RNG) or the middle window; `ShortClipError` when the clip is too short."""
    span = (frames - 1) * stride + 1
    if available < span:
        raise ShortClipError(
            f"{path}: {available} frames; a sample needs {span} (data.frames {frames} at "
            f"data.frame_stride {stride}): lower them, or remove the clip"
        )
    last_start = available - span
    start = int(torch.randint(0, last_start + 1, ())) if jitter else last_start // 2
    return range(start, start + span, stride)


def read_clip(path: str, window: Callable[[int, str], range]) -> torch.Tensor:
    """A frame folder or a video file, whichever ``path`` is (``predict`` takes both)."""
    if Path(path).is_dir():
        return read_frame_folder(path, window)
    require_pyav()
    return read_video_file(path, window)


def frame_order(path: str) -> list:
    """Sort key of a frame file: its name with every run of digits compared as a number, so that
    ``2.jpg`` comes before ``10.jpg`` (ffmpeg's ``%d.jpg``) as ``00002.jpg`` does before ``00010.jpg``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", Path(path).name)]


def read_frame_folder(path: str, window: Callable[[int, str], range]) -> torch.Tensor:
    """The frames ``window`` picks from a folder of frame images (in :func:`frame_order`) as uint8
    [T, 3, H, W]."""
    files = sorted(image_paths(Path(path)), key=frame_order)
    frames = []
    for i in window(len(files), path):
        with Image.open(files[i]) as image:
            frames.append(np.asarray(image.convert("RGB")))
    return _stack(frames, path)


def require_pyav() -> None:
    """A `UserError` naming the install command when PyAV (the video-file decoder) is missing."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise UserError(
            "video files are decoded with PyAV, which is not installed: `pip install 'cmtkd-graph[video]'` "
            "(or use frame folders: data.dataset: frame_folders)"
        ) from None


def read_video_file(path: str, window: Callable[[int, str], range]) -> torch.Tensor:
    """The frames ``window`` picks from a video file, decoded with PyAV, as uint8 [T, 3, H, W].

    The clip's length is its header's frame count, or (Matroska/WebM headers have none) its packets
    counted without decoding; frames are then decoded in order up to the last one needed and only the
    picked ones kept. A file that decodes to fewer frames than it declares is unreadable (a truncated
    file: ``data.corrupt_images`` decides)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    wanted = window(count, path)
    picked, last = set(wanted), wanted[-1]
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        if torch.utils.data.get_worker_info() is not None:
            stream.codec_context.thread_count = 1  # DataLoader workers decode side by side
        for i, frame in enumerate(container.decode(stream)):
            if i in picked:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    if len(frames) < len(wanted):
        raise ValueError(f"decodes to fewer frames than the {count} it declares")
    return _stack(frames, path)


def _stack(frames: list[np.ndarray], path: str) -> torch.Tensor:
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"frames of different sizes in {path}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


class ClipFolders(DatasetRecord):
    """Shared by both layouts: classes from ``train/``'s folders, clips listed (not decoded) up front."""

    task = "video"
    clips = True
    has_eval_split_choice = True
    reads_files_on_demand = True
    device_pipeline = False
    how_to_get = "the clips must already be in data.root"
    # Kinetics-400's, as torchvision's video weights were trained with (its VideoClassification preset)
    mean = (0.43216, 0.394666, 0.37645)
    std = (0.22803, 0.22145, 0.216989)
    read_frames: Callable[[str, Callable[[int, str], range]], torch.Tensor]

    @classmethod
    def list_clips(cls, class_dir: Path) -> list[str]:
        """The clips of one class folder, sorted."""
        raise NotImplementedError

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        root = cls.root(spec)
        train_dir = root / "train"
        eval_dir = root / pick_eval_split(root, spec.eval_split)
        classes = find_classes(train_dir)
        check_same_classes(classes, find_classes(eval_dir), eval_dir)
        size, frames = spec.input_size, spec.clip_frames
        train_tf, eval_tf = build_clip_transforms(spec, size=size, native_size=cls.native_size)

        def samples(split_dir: Path, subset: int | None) -> list[Sample]:
            found = [(c, i) for i, name in enumerate(classes) for c in cls.list_clips(split_dir / name)]
            if not found:
                raise UserError(f"no clips in {split_dir}/<class>/ ({cls.summary})")
            return balanced_first(found, subset)

        def clips(chosen: list[Sample], transform: Callable, jitter: bool) -> Clips:
            return Clips(
                chosen,
                classes,
                transform,
                spec.corrupt_images,
                frames=frames,
                stride=spec.frame_stride,
                jitter=jitter,
                read_frames=cls.read_frames,
            )

        train = samples(train_dir, spec.train_subset)
        evaluation = samples(eval_dir, spec.eval_subset)
        return DataBundle(
            train=clips(train, train_tf, jitter=True),
            eval=clips(evaluation, eval_tf, jitter=False),
            num_classes=len(classes),
            classes=classes,
            in_channels=3,
            image_size=size,
            train_eval=clips(train, eval_tf, jitter=False),
            frames=frames,
        )


@register_dataset("clip_folders")
class VideoFileFolders(ClipFolders):
    summary = (
        f"video: clip files in root/train/<class>/<clip>{'|'.join(VIDEO_EXTENSIONS)} and root/val/ (or "
        "test/) alike, decoded with PyAV"
    )
    read_frames = staticmethod(read_video_file)

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        require_pyav()
        return super().read(spec)

    @classmethod
    def list_clips(cls, class_dir: Path) -> list[str]:
        return sorted(
            e.path for e in os.scandir(class_dir) if e.is_file() and e.name.lower().endswith(VIDEO_EXTENSIONS)
        )


@register_dataset("frame_folders")
class FrameFolders(ClipFolders):
    summary = (
        "video: clips as folders of frame images, root/train/<class>/<clip>/<frames> (UCF-101 frames "
        "layout) and root/val/ (or test/) alike"
    )
    read_frames = staticmethod(read_frame_folder)

    @classmethod
    def list_clips(cls, class_dir: Path) -> list[str]:
        return sorted(e.path for e in os.scandir(class_dir) if e.is_dir() and not e.name.startswith("."))
