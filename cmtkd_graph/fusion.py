"""Fusion modules: where the teachers' features meet (docs/methods.md#shared-knowledge-eq-1).

``ImportanceFusion`` computes the shared knowledge F = sum_k softmax(a)_k F_k with learnable
importance logits ``a`` (init 0, i.e. equal weights). The composition pass puts one at every tap
(and, by default, one at the output for the combined-teacher logits); ``MeanFusion`` is the
parameter-free alternative for the output.
"""

from __future__ import annotations

import torch
from torch import nn


class Fusion(nn.Module):
    """Base class: combines K same-shaped tensors into one."""

    def __init__(self, num_inputs: int, tap: str):
        super().__init__()
        self.num_inputs = num_inputs
        self.tap = tap  # the tap's user-facing name, for importance reports and inspection

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) != self.num_inputs:
            raise ValueError(f"fusion at {self.tap!r} expects {self.num_inputs} inputs, got {len(features)}")
        w = self.weights()
        out = features[0] * w[0].to(features[0].dtype)
        for k in range(1, self.num_inputs):
            out = out + features[k] * w[k].to(features[k].dtype)
        return out

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, tap={self.tap!r}"


class ImportanceFusion(Fusion):
    """Importance-weighted sum with learnable logits (softmax keeps the weights on the simplex)."""

    def __init__(self, num_inputs: int, tap: str):
        super().__init__(num_inputs, tap)
        self.logits = nn.Parameter(torch.zeros(num_inputs))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=0)


class MeanFusion(Fusion):
    """Plain average (the ``combine: mean`` rule for the combined-teacher logits)."""

    def weights(self) -> torch.Tensor:
        return torch.full((self.num_inputs,), 1.0 / self.num_inputs)  # a constant: device-agnostic 0-dim use


def output_fusion(num_inputs: int, combine: str, tap: str) -> Fusion:
    """The combined teacher's fusion of ``num_inputs`` outputs: ``combine: importance`` (learnable
    weights) or ``mean``."""
    return ImportanceFusion(num_inputs, tap) if combine == "importance" else MeanFusion(num_inputs, tap)
