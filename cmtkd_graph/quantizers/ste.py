"""The clipped straight-through estimator shared by the fixed-step quantizers (HWGQ, DoReFa).

Forward: the levels of ``clamp(x, low, high)``; backward: the gradient passes where
``low <= x <= high`` (bounds included) and is 0 outside. Written as one autograd Function because
the usual ``levels + where(mask, x - x.detach(), 0)`` trick launches ~10 full-size kernels per
quantizer and made the quantizers as expensive as the convolutions on CPU (``bench/quantizers.py``).
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
