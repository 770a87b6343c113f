"""Image folders (``root/train/<class>/*``, ``root/val|test/<class>/*``) decoded with PIL on access.

Only file names are listed at construction, so an ImageNet-sized folder costs a directory walk, not
1.28M decodes; an unreadable image is found when a worker reads it. With ``corrupt_images: error``
that raises `CorruptImageError` naming the file (also in the main process when raised in a
DataLoader worker); with ``skip`` the sample becomes ``None``, which `DropSkipped` drops, a
`CorruptImageWarning` names the file and `ImageFiles.skipped` counts it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.data.transforms import build_transforms
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Sample = tuple[str, int]


class CorruptImageError(UserError):
    """An image file that PIL cannot decode.

    Raised in a DataLoader worker, it reaches the main process re-built by torch from the text
    "Caught CorruptImageError in DataLoader worker process N. Original Traceback ...": the original
    message is taken back from the traceback's last line, so the user reads one clear line.
    """

    def __init__(self, problems: str | list[str]):
        if isinstance(problems, str) and problems.startswith(f"Caught {type(self).__name__} "):
            problems = problems.rpartition(f"{type(self).__name__}: ")[2].strip()
        super().__init__(problems)


class CorruptImageWarning(UserWarning):
    """An unreadable image was skipped (``corrupt_images: skip``)."""


class ImageFiles(Dataset):
    """(image, class index) pairs read from files with PIL, converted to RGB, then ``transform``-ed."""

    noun = "image"  # what one file is, in messages

    def __init__(
        self,
        samples: list[Sample],
        classes: list[str],
        transform: Callable | None = None,
        corrupt_images: Literal["error", "skip"] = "error",
    ):
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.corrupt_images = corrupt_images
        # One flag per file in shared memory, so that the main process sees what DataLoader workers
        # found (whatever their start method); distinct bytes, so concurrent writes need no lock.
        self._unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> int:
        """How many distinct files were found unreadable and skipped so far."""
        return int(self._unreadable.sum())

    @property
    def skipped_files(self) -> list[str]:
        return [self.samples[i][0] for i in self._unreadable.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        image = self.decode(index, path)
        if image is None:
            return None
        return (self.transform(image) if self.transform is not None else image), label

    def decode(self, index: int, path: str) -> Image.Image | None:
        """The RGB image of sample ``index``'s file ``path``; None when unreadable and skipped."""
        try:
            with Image.open(path) as file:
                return file.convert("RGB")
        except Exception as e:  # PIL reports damaged files with many exception types
            return self.unreadable(index, path, e)

    def unreadable(self, index: int, path: str, error: Exception) -> None:
        """Raise `CorruptImageError` for ``path``, or (``corrupt_images: skip``) count sample ``index``
        as skipped and warn."""
        reason = f"{type(error).__name__}: {error}"
        if self.corrupt_images == "error":
            raise CorruptImageError(
                f"unreadable {self.noun} {path} ({reason}); repair or delete it, or set "
                f"`data.corrupt_images: skip` to drop unreadable {self.noun}s"
            ) from error
        self._unreadable[index] = True
        warnings.warn(f"skipped unreadable {self.noun} {path} ({reason})", CorruptImageWarning, stacklevel=3)
        return None


class DropSkipped:
    """Collate function: ``default_collate`` of the samples that are not None (skipped unreadable images).

    A batch whose every image was skipped comes out empty but well-formed: images (0, *image_shape)
    and labels (0, *label_shape) (a mask per image for segmentation), so that the caller's loop need
    not special-case it.
    """

    def __init__(self, image_shape: tuple[int, ...], label_shape: tuple[int, ...] = ()):
        self.image_shape, self.label_shape = tuple(image_shape), tuple(label_shape)

    def __call__(self, batch: list):
        kept = [sample for sample in batch if sample is not None]
        if not kept:
            return torch.empty(0, *self.image_shape), torch.empty(0, *self.label_shape, dtype=torch.long)
        if isinstance(kept[0][1], dict):  # detection targets: one dict per image, of its own size
            return default_collate([image for image, _ in kept]), [target for _, target in kept]
        return default_collate(kept)


def find_classes(split_dir: Path) -> list[str]:
    """The sorted class folder names of one split (hidden folders ignored)."""
    if not split_dir.is_dir():
        raise UserError(f"image folder split not found: {split_dir} (expected {split_dir}/<class>/<images>)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    return classes


def list_samples(split_dir: Path, classes: list[str]) -> list[Sample]:
    """(path, class index) of every image file, sorted by class then file name; no file is opened."""
    samples = []
    for index, name in enumerate(classes):
        samples += [(path, index) for path in image_paths(split_dir / name)]
    if not samples:
        raise UserError(f"no image files in {split_dir}/<class>/ (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return samples


def image_paths(folder: Path) -> list[str]:
    """The image files directly in ``folder`` (by extension), sorted; none is opened."""
    return sorted(
        e.path for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def pick_eval_split(root: Path, eval_split: str | None) -> str:
    """``eval_split`` if given, else ``val`` if present, else ``test``."""
    if eval_split is not None:
        if not (root / eval_split).is_dir():
            raise UserError(f"data.eval_split: {root / eval_split} is not a directory")
        return eval_split
    for name in ("val", "test"):
        if (root / name).is_dir():
            return name
    present = sorted(e.name for e in os.scandir(root) if e.is_dir()) if root.is_dir() else []
    raise UserError(
        f"no evaluation split in {root}: expected a val/ or test/ folder next to train/ "
        f"(found: {', '.join(present) or 'nothing'}); or set data.eval_split"
    )


def check_same_classes(train: list[str], evaluation: list[str], eval_dir: Path) -> None:
    if train == evaluation:
        return
    only_train = sorted(set(train) - set(evaluation))
    only_eval = sorted(set(evaluation) - set(train))
    raise UserError(
        f"class folders differ between train/ and {eval_dir.name}/ in {eval_dir.parent}: "
        f"only in train: {_few(only_train)}; only in {eval_dir.name}: {_few(only_eval)}. "
        "Both splits need the same class folders (an empty folder is fine)"
    )


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def balanced_first(samples: list[Sample], n: int | None) -> list[Sample]:
    """The first ``n`` samples taking the classes in turn: file i of every class before file i + 1."""
    if n is None or n >= len(samples):
        return samples
    seen: dict[int, int] = {}
    order = []
    for position, (_, label) in enumerate(samples):
        rank = seen.get(label, 0)
        seen[label] = rank + 1
        order.append((rank, label, position))
    chosen = sorted(position for _, _, position in sorted(order)[:n])
    return [samples[p] for p in chosen]


@register_dataset("imagefolder")
class ImageFolder(DatasetRecord):
    summary = "image files in root/train/<class>/ and root/val/ (or test/) alike, decoded on access"
    has_eval_split_choice = True
    reads_files_on_demand = True

    @classmethod
    def read(cls, spec: DataSpec) -> DataBundle:
        if spec.root is None:
            raise UserError("data.root: required for imagefolder (the directory of train/ and val/ or test/)")
        root = Path(spec.root)
        if not root.is_dir():
            raise UserError(
                f"data.root: {root} is not a directory (expected {root}/train/<class>/<images> and "
                f"{root}/val/ or {root}/test/ alike)"
            )
        train_dir = root / "train"
        eval_dir = root / pick_eval_split(root, spec.eval_split)
        classes = find_classes(train_dir)
        check_same_classes(classes, find_classes(eval_dir), eval_dir)
        size = spec.input_size
        train_tf, eval_tf = build_transforms(spec, size=size, native_size=None, in_channels=3)
        train = balanced_first(list_samples(train_dir, classes), spec.train_subset)
        evaluation = balanced_first(list_samples(eval_dir, classes), spec.eval_subset)
        return DataBundle(
            train=ImageFiles(train, classes, train_tf, spec.corrupt_images),
            eval=ImageFiles(evaluation, classes, eval_tf, spec.corrupt_images),
            num_classes=len(classes),
            classes=classes,
            in_channels=3,
            image_size=size,
            train_eval=ImageFiles(train, classes, eval_tf, spec.corrupt_images),
        )
