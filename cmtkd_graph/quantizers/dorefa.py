"""DoReFa-Net quantizers (Zhou et al., 2016), a baseline: fixed ranges, straight-through rounding.

q_k(r) = round((2^k - 1) r) / (2^k - 1) quantizes r in [0, 1] to 2^k evenly spaced levels; weights
are squashed into [0, 1] with tanh first, activations are clipped to [0, 1].

Formulas and the reference implementation: docs/methods.md#dorefa.
"""

from __future__ import annotations

import torch

from cmtkd_graph.quantizers.base import (
    IntegerGrid,
    Quantizer,
    QuantizerFamily,
    mid_rise_grid,
    odd_integers,
    register_quantizer,
    unsigned_grid,
)
from cmtkd_graph.quantizers.ste import clipped_ste, identity_ste


def unit_integers(r: torch.Tensor, bits: int) -> torch.Tensor:
    """round((2^k - 1) r) for r in [0, 1]: the index m of q_k(r) = m / (2^k - 1); no gradient.

    Computed as round(r / s) with s = 1 / (2^k - 1) in float32, the division ONNX's QuantizeLinear
    does, so an exported model rounds exactly as this one.
    """
    return torch.round(r / (1.0 / (2**bits - 1)))


class DoReFaWeightQuantizer(Quantizer):
    """k >= 2: w_q = 2 q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, 2^k levels on [-1, 1].

    k = 1: w_q = E|w| * sign(w) with E over the whole tensor and sign(0) = +1; identity STE.
    As integers: w_q = (2m - n) / n with m = 0..n, n = 2^k - 1 (odd integers times 1/n), or sign(w) E|w|.
    """

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)

    @property
    def grid(self) -> IntegerGrid:
        return mid_rise_grid(self.bits)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            return identity_ste(w, self._binary_levels)
        r = self._unit(w)
        n = 2**self.bits - 1
        # forward: the odd integer 2m - n times 1/n; backward: d/dw of 2r - 1 (q_k's identity STE)
        levels = (2 * unit_integers(r.detach(), self.bits) - n) * (1.0 / n)
        return levels + 2 * (r - r.detach())

    def _binary_levels(self, w: torch.Tensor) -> torch.Tensor:
        sign, mean = self.integers(w)
        return sign.mul_(mean)

    def integers(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits == 1:
            return torch.where(w >= 0, 1.0, -1.0), w.abs().mean()
        n = 2**self.bits - 1
        return 2 * unit_integers(self._unit(w), self.bits) - n, w.new_tensor(1.0 / n)

    @staticmethod
    def _unit(w: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(w)
        # The tiny floor keeps an all-zero weight finite instead of 0/0 = NaN.
        return t / (2 * t.abs().max().clamp(min=torch.finfo(torch.float32).tiny)) + 0.5


class DoReFaActivationQuantizer(Quantizer):
    """Unsigned: q_k(clamp(x, 0, 1)). Signed: 2 q_k((clamp(x, -1, 1) + 1) / 2) - 1.

    The signed variant is the weight mapping without tanh: 2^k levels evenly spaced on [-1, 1],
    both ends included (zero is not a level). Gradient 1 inside the clip range (bounds included), 0 outside.
    As integers: m / n (unsigned) or (2m - n) / n (signed), n = 2^k - 1.
    """

    @property
    def grid(self) -> IntegerGrid:
        return mid_rise_grid(self.bits) if self.signed else unsigned_grid(self.bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return clipped_ste(x, self._low(), 1.0, lambda c: self._integers(c).mul_(1.0 / (2**self.bits - 1)))

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._integers(x.clamp(self._low(), 1.0))
        return q, x.new_tensor(1.0 / (2**self.bits - 1))

    def _low(self) -> float:
        return -1.0 if self.signed else 0.0

    def _integers(self, clipped: torch.Tensor) -> torch.Tensor:
        if self.signed:  # (2m - n) / n: odd multiples of 1/n
            return odd_integers(clipped, 1.0 / (2**self.bits - 1))
        return unit_integers(clipped, self.bits)


@register_quantizer("dorefa")
class DoReFa(QuantizerFamily):
    """DoReFa weights and activations (no learned parameters)."""

    def activation(self, bits: int, signed: bool) -> Quantizer:
        return DoReFaActivationQuantizer(bits, signed)

    def weight(self, bits: int) -> Quantizer:
        return DoReFaWeightQuantizer(bits)
