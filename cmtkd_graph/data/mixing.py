"""MixUp and CutMix of training batches (``data.augment.mixup_alpha`` / ``cutmix_alpha``).

torchvision's own ``v2.MixUp`` / ``v2.CutMix`` (one of the two per batch, at random, when both are on, as
torchvision's classification reference does) turn a batch of images and class indices into mixed images
and soft labels ``[B, classes]``: rows of ``lam`` one-hot(y) + ``(1 - lam)`` one-hot(y of the rolled
batch). They run in the training loop, not in the loader's workers, with their random numbers drawn
from a generator seeded by (spec seed, epoch, batch, process): a resumed run mixes its batches exactly
as the uninterrupted run did.

The loss terms take soft labels as they are: cross-entropy against probabilities, and KDCL-MinLogit
aligns the logits on the label-weighted logit (``losses.kdcl_min_logit``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from cmtkd_graph.spec import AugmentSpec


class BatchMixing:
    """``mix(images, labels, epoch=, batch=)`` -> (mixed images, soft labels); see the module docstring."""

    def __init__(self, augment: AugmentSpec, num_classes: int, *, seed: int, rank: int = 0):
        choices = []
        if augment.mixup_alpha:
            choices.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
        if augment.cutmix_alpha:
            choices.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMixing needs mixup_alpha or cutmix_alpha")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed, self.rank = seed, rank

    def __call__(self, images: Tensor, labels: Tensor, *, epoch: int, batch: int) -> tuple[Tensor, Tensor]:
        if images.shape[0] == 0:  # every image of the batch was unreadable and skipped
            return images, labels
        with torch.random.fork_rng(devices=[]):  # v2's MixUp/CutMix draw from the CPU generator only
            torch.default_generator.manual_seed(hash((self.seed, epoch, batch, self.rank)) % 2**63)
            return self.transform(images, labels)


def batch_mixing(augment: AugmentSpec, num_classes: int, *, seed: int, rank: int = 0) -> BatchMixing | None:
    """The run's batch mixing, or None when ``augment`` mixes nothing."""
    return BatchMixing(augment, num_classes, seed=seed, rank=rank) if augment.mixes() else None


__all__ = ["BatchMixing", "batch_mixing"]
