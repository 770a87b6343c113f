"""`build_loaders`: seeded, shuffled training batches and ordered evaluation batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.device import DeviceBatches, device_batches
from cmtkd_graph.data.imagefolder import DropSkipped
from cmtkd_graph.data.seeding import SeededSamples
from cmtkd_graph.errors import UserError
from cmtkd_graph.registry import DATASETS, TASKS
from cmtkd_graph.spec import DataSpec


def build_loaders(
    bundle: DataBundle,
    spec: DataSpec,
    *,
    train_batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    processes: int = 1,
) -> tuple[DataLoader | DeviceBatches, DataLoader]:
    """(train, eval) loaders. Train: reshuffled every epoch from ``seed``, incomplete last batch dropped.

    Both collate with `DropSkipped`, so a batch is smaller (possibly empty) when unreadable images
    were skipped (``corrupt_images: skip``). Training samples are `SeededSamples`: their random
    augmentation depends only on (seed, epoch, index), whichever process or worker produces them.
    With ``data.pipeline: device`` the training batches are :class:`DeviceBatches` on ``device``, this
    process's (``rank`` of ``processes``) share already taken: accelerate passes them through as they are.
    """
    evaluation = build_eval_loader(bundle, spec, bundle.eval, batch_size=eval_batch_size, seed=seed)
    if spec.pipeline == "device":
        train = device_batches(
            bundle,
            spec,
            batch_size=train_batch_size,
            seed=seed,
            device=device,
            rank=rank,
            processes=processes,
        )
        return train, evaluation
    if len(bundle.train) < train_batch_size:
        raise UserError(
            f"the training set has {len(bundle.train)} samples, fewer than one batch of "
            f"{train_batch_size} (the last incomplete batch is dropped); lower data.batch_size "
            "or use more samples (data.train_subset)"
        )
    train = DataLoader(
        SeededSamples(bundle.train, seed),
        batch_size=train_batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **_common(bundle, spec),
    )
    return train, evaluation


def eval_batch_size(data: DataSpec, processes: int, accumulation: int = 1) -> int:
    """The per-process evaluation batch: ``data.eval_batch_size``, else the per-process training batch."""
    return data.eval_batch_size or max(data.batch_size // (processes * accumulation), 1)


def build_eval_loader(
    bundle: DataBundle, spec: DataSpec, dataset: Dataset, *, batch_size: int, seed: int
) -> DataLoader:
    """Every sample of ``dataset`` once, in order (the evaluation split, or ``bundle.train_eval``)."""
    # Its own generator: creating an iterator draws a seed, and evaluation must not move the global RNG
    # (training's random augmentation), or a run resumed after an evaluation would diverge.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        **_common(bundle, spec),
    )


def _common(bundle: DataBundle, spec: DataSpec) -> dict:
    image_shape = bundle.input_shape
    return dict(
        num_workers=spec.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=spec.num_workers > 0,
        collate_fn=DropSkipped(image_shape, _label_shape(spec, image_shape)),
    )


def _label_shape(spec: DataSpec, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one sample's label: () for a class, (H, W) for a mask (the dataset's task says)."""
    return TASKS.get(DATASETS.get(spec.dataset).task).label_shape(image_shape)
