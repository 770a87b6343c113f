"""The straight-through estimators shared by the fixed-step quantizers (HWGQ, DoReFa).

``clipped_ste`` (activations). Forward: the levels of ``clamp(x, low, high)``; backward: the gradient
passes where ``low <= x <= high`` (bounds included) and is 0 outside. Written as one autograd Function
because the usual ``levels + where(mask, x - x.detach(), 0)`` trick launches ~10 full-size kernels per
quantizer and made the quantizers as expensive as the convolutions on CPU (``bench/quantizers.py``).

``identity_ste`` (weights). Forward: the levels; backward: the gradient unchanged. The usual
``levels + (w - w.detach())`` costs two more full-size passes and allocations per weight and step,
which for AlexNet's 4096x9216 classifier weights are a large part of a CMT-KD step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _ClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, low: float, high: float, to_levels: Callable[[torch.Tensor], torch.Tensor]
    ):
        clipped = x.clamp(low, high)
        ctx.save_for_backward(clipped == x)  # inside the range, bounds included
        return to_levels(clipped)  # may work in place on `clipped`

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def clipped_ste(
    x: torch.Tensor, low: float, high: float, to_levels: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``to_levels(clamp(x, low, high))`` with the clipped straight-through gradient."""
    return _ClippedSTE.apply(x, low, high, to_levels)


class _IdentitySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, to_levels: Callable[[torch.Tensor], torch.Tensor]):
        return to_levels(w)  # must not modify w in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def identity_ste(w: torch.Tensor, to_levels: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``to_levels(w)`` with the identity straight-through gradient."""
    return _IdentitySTE.apply(w, to_levels)
