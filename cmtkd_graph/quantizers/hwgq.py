"""HWGQ: half-wave Gaussian quantization (Cai et al., CVPR 2017), the paper's main quantizer.

Activations after BN+ReLU are roughly a unit Gaussian cut at zero, so a *fixed* uniform step that
is MSE-optimal for that distribution works without any learned parameter. Weights are quantized
with a symmetric mid-rise grid scaled by the layer's standard deviation (2^b levels, no zero).
The formulas and constants: docs/methods.md#hwgq.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

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

HALF_WAVE_STEP: dict[int, float] = {
    1: 0.7979,
    2: 0.5388,
    3: 0.3217,
    4: 0.1842,
    5: 0.1030,
    6: 0.0566,
    7: 0.0307,
    8: 0.0165,
}
"""Activation step h_b: the uniform step s minimising E[(Q(x) - x)^2 | x > 0] for x ~ N(0, 1), where Q
maps every positive x to the nearest of the 2^b - 1 NON-zero levels {s, 2s, ..., (2^b - 1)s} (the
original Caffe mapping; negatives go to 0 exactly and add no error). Hence h_1 = E[x | x > 0] =
sqrt(2/pi). Found by numerical minimisation with scipy (re-derived in tests/test_quantizers.py) and
rounded to 4 decimals. Note: for the round-to-nearest mapping that includes the zero level, the
MSE-optimal steps would be larger (e.g. 1.224 at 1 bit, 0.651 at 2 bits); the table is the Caffe one.
"""

MID_RISE_STEP: dict[int, float] = {
    1: 1.5958,
    2: 0.9957,
    3: 0.5860,
    4: 0.3352,
    5: 0.1881,
    6: 0.1041,
    7: 0.0569,
    8: 0.0308,
}
"""Weight step g_b: the uniform step g minimising E[(Q(x) - x)^2] for x ~ N(0, 1), where Q maps x to the
nearest of the 2^b symmetric mid-rise levels {+-(k - 1/2) g : k = 1..2^(b-1)} (Max's optimal uniform
quantizer; g_1 = 2 E|x| = 2 sqrt(2/pi)). Found by numerical minimisation with scipy (re-derived in
tests/test_quantizers.py) and rounded to 4 decimals.
"""


class HalfWaveQuantizer(Quantizer):
    """Unsigned activations: levels {0, s, ..., (2^b - 1)s} with s = h_b; clipped-ReLU STE.

    ``caffe_rounding``: every x > 0 goes to the nearest non-zero level (the mapping h_b is optimal
    for); otherwise plain round-to-nearest, so small positive x go to 0.
    """

    def __init__(self, bits: int, caffe_rounding: bool = False):
        super().__init__(bits, signed=False)
        self.step = HALF_WAVE_STEP[bits]
        self.caffe_rounding = caffe_rounding

    @property
    def grid(self) -> IntegerGrid:
        return unsigned_grid(self.bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return clipped_ste(x, 0.0, self._top(), lambda c: self._codes(c).mul_(self.step))

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._codes(x.clamp(0.0, self._top())), x.new_tensor(self.step)

    def _top(self) -> float:
        return (2**self.bits - 1) * self.step

    def _codes(self, clipped: torch.Tensor) -> torch.Tensor:
        """Works in place on ``clipped`` (always a fresh tensor: clamp's result)."""
        positive = (clipped > 0) if self.caffe_rounding else None
        k = clipped.div_(self.step).round_()
        if positive is not None:
            k = torch.maximum(k, positive.to(k.dtype))  # positive inputs never map to 0
        return k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step={self.step}, caffe_rounding={self.caffe_rounding}"


class SignedMidRiseQuantizer(Quantizer):
    """Signed activations (producer can be negative): 2^b mid-rise levels with step g_b at unit scale.

    Gradient 1 inside the clip range +-(2^(b-1) - 1/2) g_b, 0 outside.
    """

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)
        self.step = MID_RISE_STEP[bits]

    @property
    def grid(self) -> IntegerGrid:
        return mid_rise_grid(self.bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        limit = self._limit()
        return clipped_ste(x, -limit, limit, lambda c: odd_integers(c, self.step / 2).mul_(self.step / 2))

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self._limit()
        return odd_integers(x.clamp(-limit, limit), self.step / 2), x.new_tensor(self.step / 2)

    def _limit(self) -> float:
        return (2 ** (self.bits - 1) - 0.5) * self.step

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step={self.step}"


class MidRiseWeightQuantizer(Quantizer):
    """Weights: 2^b mid-rise levels with step t = g_b * std(W) (a constant); identity STE."""

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)
        self.step = MID_RISE_STEP[bits]

    @property
    def grid(self) -> IntegerGrid:
        return mid_rise_grid(self.bits)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return identity_ste(w, self._levels)

    def _levels(self, w: torch.Tensor) -> torch.Tensor:
        q, half_step = self.integers(w)
        return q.mul_(half_step)

    def integers(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The tiny floor keeps a constant (std 0) weight finite instead of 0/0 = NaN.
        t = (self.step * w.std()).clamp(min=torch.finfo(torch.float32).tiny)
        limit = (2 ** (self.bits - 1) - 0.5) * t
        return odd_integers(w.clamp(-limit, limit), t / 2), t / 2

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step={self.step}*std(W)"


class ChannelBinaryWeightQuantizer(Quantizer):
    """1-bit weights: alpha_c * sign(W), alpha_c = mean|W| of output channel c; identity STE.

    sign(0) is +1, so every channel has exactly the two levels +-alpha_c.
    """

    def __init__(self):
        super().__init__(1, signed=True)

    @property
    def grid(self) -> IntegerGrid:
        return mid_rise_grid(1)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return identity_ste(w, self._levels)

    def _levels(self, w: torch.Tensor) -> torch.Tensor:
        sign, alpha = self.integers(w)
        return sign.mul_(alpha)

    def integers(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() > 1 else w.abs()
        return torch.where(w >= 0, 1.0, -1.0), alpha


class HWGQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caffe_rounding: bool = False
    """Map every positive activation to the nearest non-zero level, as the original Caffe code does."""


@register_quantizer("hwgq")
class HWGQ(QuantizerFamily):
    """Fixed-step HWGQ quantizers: no learned parameters."""

    Options = HWGQOptions

    def activation(self, bits: int, signed: bool) -> Quantizer:
        if signed:
            return SignedMidRiseQuantizer(bits)
        return HalfWaveQuantizer(bits, caffe_rounding=self.options.caffe_rounding)

    def weight(self, bits: int) -> Quantizer:
        return ChannelBinaryWeightQuantizer() if bits == 1 else MidRiseWeightQuantizer(bits)
