"""Datasets, transforms and loaders declared by the spec's `data:` section.

``build_datasets(spec.data)`` reads the data into a `DataBundle`; ``build_loaders`` batches it.
With ``corrupt_images: skip``, ``DataBundle.skipped_images()`` tells how many unreadable images
were found and dropped so far (distinct files, seen across DataLoader worker processes).
"""

from cmtkd_graph.data.bundle import DataBundle, build_datasets
from cmtkd_graph.data.imagefolder import CorruptImageError, CorruptImageWarning, DropSkipped
from cmtkd_graph.data.loaders import build_loaders

__all__ = [
    "CorruptImageError",
    "CorruptImageWarning",
    "DataBundle",
    "DropSkipped",
    "build_datasets",
    "build_loaders",
]
