"""Datasets, transforms and loaders declared by the spec's `data:` section.

Each dataset is a record (``record.py``) in a file of its own, registered by name: ``cifar.py`` (cifar10,
cifar100), ``fashion_mnist.py``, ``imagefolder.py``, ``segmentation_files.py`` (voc, mask_folders),
``scenes.py`` (fashion_scenes), ``clips.py`` (clip_folders, frame_folders), ``moving.py``
(moving_fashion), ``flow_files.py`` (flow_pairs), ``fashion_flow.py`` (fashion_flow), ``detections.py``
(coco_folder, voc_boxes), ``fashion_objects.py`` (fashion_objects).
``build_datasets(spec.data)`` reads the data into a `DataBundle`; ``build_loaders`` batches it. With
``corrupt_images: skip``, ``DataBundle.skipped_images()`` tells how many
unreadable images were found and dropped so far (distinct files, seen across DataLoader worker processes).
"""

from cmtkd_graph.data import (  # noqa: F401  (register the datasets)
    cifar,
    clips,
    detections,
    fashion_flow,
    fashion_mnist,
    fashion_objects,
    flow_files,
    imagefolder,
    moving,
    scenes,
    segmentation_files,
)
from cmtkd_graph.data.bundle import DataBundle, build_datasets
from cmtkd_graph.data.imagefolder import CorruptImageError, CorruptImageWarning, DropSkipped
from cmtkd_graph.data.loaders import build_loaders
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.registry import DATASETS

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "CorruptImageWarning",
    "DataBundle",
    "DatasetRecord",
    "DropSkipped",
    "build_datasets",
    "build_loaders",
    "register_dataset",
]
