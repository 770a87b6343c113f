"""`build_datasets`: the train and eval datasets a `DataSpec` declares, with their transforms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmtkd_graph.registry import DATASETS
from cmtkd_graph.spec import DataSpec


@dataclass(frozen=True)
class DataBundle:
    """What the rest of the tool needs to know about the data: the two splits and the model's input."""

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_classes: int
    classes: list[str]
    in_channels: int  # 3, or 1 for grey images with grey_to_rgb: none
    image_size: int  # the model input size
    train_eval: torch.utils.data.Dataset  # the training samples with the evaluation transform
    colours: list[tuple[int, int, int]] | None = None  # segmentation: each class's colour, if declared
    frames: int | None = None  # clips: T frames each

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one model input, (C, T, H, W) for clips."""
        time = (self.frames,) if self.frames is not None else ()
        return (self.in_channels, *time, self.image_size, self.image_size)

    def skipped_images(self) -> int:
        """Distinct unreadable images skipped so far in both splits (``corrupt_images: skip``; else 0)."""
        return sum(getattr(ds, "skipped", 0) for ds in (self.train, self.eval))


def build_datasets(spec: DataSpec) -> DataBundle:
    """Read the dataset ``spec`` names (raising UserError on missing or malformed data): its record's
    ``read`` (``cmtkd_graph/data/record.py``)."""
    return DATASETS.get(spec.dataset).read(spec)
