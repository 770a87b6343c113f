"""DoReFa-Net quantizers (Zhou et al., 2016), a baseline: fixed ranges, straight-through rounding.

q_k(r) = round((2^k - 1) r) / (2^k - 1) quantizes r in [0, 1] to 2^k evenly spaced levels; weights
are squashed into [0, 1] with tanh first, activations are clipped to [0, 1].
"""

from __future__ import annotations

import torch

from cmtkd_graph.quantizers.base import Quantizer, QuantizerFamily, register_quantizer
from cmtkd_graph.quantizers.ste import clipped_ste


def quantize_unit(r: torch.Tensor, bits: int) -> torch.Tensor:
    """q_k(r) for r in [0, 1]: forward rounds to 2^k levels, backward is the identity."""
    n = 2**bits - 1
    return torch.round(r.detach() * n) / n + (r - r.detach())


class DoReFaWeightQuantizer(Quantizer):
    """k >= 2: w_q = 2 q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, 2^k levels on [-1, 1].

    k = 1: w_q = E|w| * sign(w) with E over the whole tensor and sign(0) = +1; identity STE.
    """

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            w0 = w.detach()
            return w0.abs().mean() * torch.where(w0 >= 0, 1.0, -1.0) + (w - w0)
        t = torch.tanh(w)
        # The tiny floor keeps an all-zero weight finite instead of 0/0 = NaN.
        r = t / (2 * t.abs().max().clamp(min=torch.finfo(torch.float32).tiny)) + 0.5
        return 2 * quantize_unit(r, self.bits) - 1


class DoReFaActivationQuantizer(Quantizer):
    """Unsigned: q_k(clamp(x, 0, 1)). Signed: 2 q_k((clamp(x, -1, 1) + 1) / 2) - 1.

    The signed variant is the weight mapping without tanh: 2^k levels evenly spaced on [-1, 1],
    both ends included (zero is not a level). Gradient 1 inside the clip range (bounds included), 0 outside.
    """

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return clipped_ste(x, -1.0 if self.signed else 0.0, 1.0, self._levels)

    def _levels(self, clipped: torch.Tensor) -> torch.Tensor:
        if self.signed:
            return 2 * quantize_unit((clipped + 1) / 2, self.bits) - 1
        return quantize_unit(clipped, self.bits)


@register_quantizer("dorefa")
class DoReFa(QuantizerFamily):
    """DoReFa weights and activations (no learned parameters)."""

    def activation(self, bits: int, signed: bool) -> Quantizer:
        return DoReFaActivationQuantizer(bits, signed)

    def weight(self, bits: int) -> Quantizer:
        return DoReFaWeightQuantizer(bits)
