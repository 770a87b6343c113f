"""The dataset record: what the rest of the tool knows about one dataset, and how to read it.

A dataset is a subclass of :class:`DatasetRecord` registered by name (``@register_dataset("name")``),
like the methods and the quantizers. Its class attributes are the facts the spec's checks, the
transforms and ``predict`` ask for (native size, channels, mean/std, default flip, whether it can be
downloaded, whether it has a choice of evaluation folder, whether its images are files read on demand);
:meth:`DatasetRecord.read` turns a ``data:`` section into a :class:`~cmtkd_graph.data.bundle.DataBundle`.

Adding an image dataset touches one file: write the record (and its reader) in it, and import the file
in ``cmtkd_graph/data/__init__.py`` (the registration). Nothing else branches on a dataset's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.errors import UserError
from cmtkd_graph.registry import DATASETS
from cmtkd_graph.spec import DataSpec

IMAGE_FOLDER_INPUT_SIZE = 224
"""The default model input for folders of images of any size (ImageNet's)."""


class DatasetRecord:
    """Base class of a dataset record (see the module docstring). Class attributes are the facts."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for the spec reference: what it is and where it is read from
    task: ClassVar[str] = "classification"  # the task its samples are for (cmtkd_graph.tasks)
    native_size: ClassVar[int | None] = None  # side of its square images; None: files of any size
    grey: ClassVar[bool] = False  # 1-channel images (repeated to RGB unless data.grey_to_rgb: none)
    mean: ClassVar[tuple[float, ...]] = (0.485, 0.456, 0.406)  # per channel, [0, 1] (default: ImageNet's)
    std: ClassVar[tuple[float, ...]] = (0.229, 0.224, 0.225)
    hflip: ClassVar[bool] = True  # the default of data.augment.hflip
    downloadable: ClassVar[bool] = False  # data.download: true can fetch it
    how_to_get: ClassVar[str] = "the images must already be in data.root"  # when it cannot be downloaded
    default_root: ClassVar[str | None] = None  # data.root when the spec gives none
    has_eval_split_choice: ClassVar[bool] = False  # data.eval_split names the evaluation folder
    has_class_choice: ClassVar[bool] = False  # data.classes chooses the categories of the files
    reads_files_on_demand: ClassVar[bool] = False  # images decoded per access (data.corrupt_images: skip)
    device_pipeline: ClassVar[bool] = True  # data.pipeline: device can decode it (one label per image)
    clips: ClassVar[bool] = False  # samples are clips of frames (data.frames, data.frame_stride)
    default_frames: ClassVar[int] = 16  # clips: data.frames when the spec gives none

    @classmethod
    def input_size(cls) -> int:
        """The model input size when ``data.image_size`` is not given."""
        return cls.native_size or IMAGE_FOLDER_INPUT_SIZE

    @classmethod
    def root(cls, spec: DataSpec) -> Path:
        """``data.root`` (or the record's ``default_root``) as an existing directory; a UserError says
        which is missing."""
        root = spec.root or cls.default_root
        if root is None:
            raise UserError(f"data.root: required for {cls.name} ({cls.summary})")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"data.root: {root} is not a directory; {cls.how_to_get}")
        return root

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        """Both splits with their transforms (a UserError names missing or malformed data)."""
        raise NotImplementedError


def register_dataset(name: str):
    """Class decorator: register a :class:`DatasetRecord` subclass under ``name`` (and set its ``name``)."""
    return DATASETS.register_record(name)
