"""``data.pipeline: device``: the training images decoded once into one uint8 tensor on the training
device, and each batch augmented there as a whole (random crop with padding, horizontal flip,
normalisation), so that a GPU is not left waiting for per-image work in loader processes.

For datasets of small square images that fit in memory: CIFAR-10/100 and Fashion-MNIST (already
decoded by their readers) and image folders of small images (decoded here, in parallel, once per run).
The evaluation split keeps the ordinary loader (``loaders.build_eval_loader``), which counts every image
once under ``accelerate launch`` too.

As with the worker pipeline, a batch is a pure function of (seed, epoch, batch index): the order of an
epoch comes from a generator seeded with (seed, epoch), the crops and flips of batch b from one seeded
with (seed, epoch, b). So ``--resume`` continues exactly, mid-epoch included, on CPU and GPU alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.imagefolder import ImageFiles
from cmtkd_graph.data.in_memory import TensorImages
from cmtkd_graph.data.seeding import sample_seed
from cmtkd_graph.data.transforms import mean_std
from cmtkd_graph.errors import UserError
from cmtkd_graph.registry import DATASETS
from cmtkd_graph.spec import DataSpec


class DeviceBatches:
    """Training batches of (images, labels) on ``device``: this process's share of every global batch.

    ``images``: uint8 [N, C, S, S] at the model's input size; a global batch is ``batch_size x
    processes`` consecutive indices of the epoch's permutation, of which process ``rank`` takes its
    ``batch_size``; the incomplete last global batch is dropped.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: DataSpec,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        processes: int = 1,
    ):
        augment = spec.augment
        crop = augment.crop or "random_crop"
        if crop not in ("random_crop", "none"):
            raise UserError(
                f"data.augment.crop: {crop} needs per-image resizing; data.pipeline: device does "
                "random_crop (with padding) or none"
            )
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.seed, self.rank, self.processes = batch_size, seed, rank, processes
        self.padding = augment.padding if crop == "random_crop" else 0
        self.hflip = augment.hflip if augment.hflip is not None else DATASETS.get(spec.dataset).hflip
        self.channels = spec.in_channels
        mean, std = mean_std(spec, self.channels)
        mean_t = torch.tensor(mean if mean is not None else [0.0], device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std if std is not None else [1.0], device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std_t), -mean_t / std_t
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def skip_first_batches(self, count: int) -> DeviceBatches:
        """This epoch from batch ``count`` on (a resumed run)."""
        self.start = count
        return self

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self.processes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(
            len(self.images), generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        )
        start, self.start = self.start, 0
        for b in range(start, len(self)):
            first = (b * self.processes + self.rank) * self.batch_size
            index = order[first : first + self.batch_size].to(self.images.device)
            yield self.augment(self.images[index], b), self.labels[index]

    def augment(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        """Random crop (zero padding, as torchvision's RandomCrop) and flip of a uint8 batch, then float
        and normalised: the worker pipeline's transforms, batched."""
        n, _, size, _ = images.shape
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, batch))
        if self.padding:
            p = self.padding
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=g).to(images.device)
            padded = F.pad(images, (p, p, p, p))
            steps = torch.arange(size, device=images.device)
            rows = (offsets[:, 0:1] + steps)[:, :, None]  # [n, size, 1]
            cols = (offsets[:, 1:2] + steps)[:, None, :]  # [n, 1, size]
            batch_index = torch.arange(n, device=images.device)[:, None, None]
            images = padded[batch_index, :, rows, cols].permute(0, 3, 1, 2)  # [n, C, size, size]
        if self.hflip:
            flip = (torch.rand(n, generator=g) < 0.5).to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if images.shape[1] != self.channels:  # grey images for an RGB model
            images = images.expand(-1, self.channels, -1, -1)
        return images.float() * self.scale + self.shift


def device_batches(
    bundle: DataBundle,
    spec: DataSpec,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    rank: int = 0,
    processes: int = 1,
) -> DeviceBatches:
    """The training split of ``bundle``, decoded once, as :class:`DeviceBatches`."""
    images, labels = decoded(bundle.train, bundle.image_size, workers=spec.num_workers)
    if len(images) < batch_size * processes:
        raise UserError(
            f"the training set has {len(images)} samples, fewer than one batch of {batch_size} x "
            f"{processes} process(es); lower data.batch_size or use more samples (data.train_subset)"
        )
    return DeviceBatches(
        images, labels, spec, batch_size=batch_size, seed=seed, device=device, rank=rank, processes=processes
    )


def decoded(dataset: Dataset, size: int, *, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, size, size] and int64 labels of a training split: the tensors of an in-memory
    dataset (resized if the model wants another size), or every file of an image folder decoded and
    fitted to a square as its evaluation transform does (resize the short side, centre crop)."""
    if isinstance(dataset, TensorImages):
        images = dataset.images
        if images.shape[-1] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        return images, dataset.labels.long()
    if isinstance(dataset, ImageFiles):
        paths = [path for path, _ in dataset.samples]
        if workers > 0:
            with ProcessPoolExecutor(workers) as pool:
                images = list(pool.map(_decode_file, paths, [size] * len(paths), chunksize=256))
        else:
            images = [_decode_file(path, size) for path in paths]
        labels = torch.tensor([label for _, label in dataset.samples], dtype=torch.long)
        return torch.stack(images), labels
    raise UserError(f"data.pipeline: device cannot decode a {type(dataset).__name__}; use pipeline: workers")


def _decode_file(path: str, size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import v2

    try:
        with Image.open(path) as file:
            image = file.convert("RGB")
    except Exception as e:  # PIL reports damaged files with many exception types
        raise UserError(
            f"unreadable image {path} ({type(e).__name__}: {e}); repair or delete it "
            "(data.pipeline: device decodes every image before training)"
        ) from None
    if image.size != (size, size):  # as the evaluation transform fits a small image: on the PIL image
        image = v2.functional.center_crop(v2.functional.resize(image, size), [size, size])
    return v2.functional.pil_to_tensor(image)
