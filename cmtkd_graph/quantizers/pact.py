"""PACT (Choi et al., 2018), a baseline: activations clipped at a learned alpha, then quantized uniformly.

Weights use DoReFa's weight quantizer, as in the PACT paper. The clipping level alpha is regularised
by L2 (the paper's lambda_alpha), by default with the weight decay of the network it quantizes.

Formulas and the reference implementation: docs/methods.md#pact.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cmtkd_graph.quantizers.base import (
    IntegerGrid,
    Quantizer,
    QuantizerFamily,
    mid_rise_grid,
    odd_integers,
    register_quantizer,
    unsigned_grid,
)
from cmtkd_graph.quantizers.dorefa import DoReFaWeightQuantizer


class PACTQuantizer(Quantizer):
    """Unsigned: y = clamp(x, 0, alpha) on 2^k levels {0, alpha/n, ..., alpha}, n = 2^k - 1.

    Signed: y = clamp(x, -alpha, alpha) on 2^k levels evenly spaced over [-alpha, alpha] (ends
    included, zero is not a level).
    Gradients (PACT's STE): d y / d x = 1 for 0 (signed: -alpha) <= x < alpha, 0 outside;
    d y / d alpha = 1 where x >= alpha (signed: also -1 where x < -alpha), 0 elsewhere, i.e. the
    rounding error is ignored.
    """

    def __init__(self, bits: int, signed: bool, init_alpha: float, alpha_decay: float | None = None):
        super().__init__(bits, signed)
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.alpha_decay = alpha_decay

    def parameter_decay(self, weight_decay: float) -> float:
        """lambda_alpha: ``alpha_decay``, or the network's weight decay where it is None."""
        return weight_decay if self.alpha_decay is None else self.alpha_decay

    @property
    def grid(self) -> IntegerGrid:
        return mid_rise_grid(self.bits) if self.signed else unsigned_grid(self.bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.float()
        low = -alpha if self.signed else torch.zeros_like(alpha)
        # where() sends the gradient of a clipped element to alpha and of the others to x.
        y = torch.where(x >= alpha, alpha, torch.where(x < low, low, x))
        q, scale = self._integers(y.detach(), alpha.detach())
        return q * scale + (y - y.detach())

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alpha.detach().float()
        low = -alpha if self.signed else torch.zeros_like(alpha)
        return self._integers(torch.minimum(torch.maximum(x, low), alpha), alpha)

    def _integers(self, clipped: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsigned: m = round(n y / alpha), level m alpha / n. Signed: m = round(n (y + alpha) / (2 alpha)),
        level (2m - n) alpha / n (odd integers). n = 2^k - 1."""
        n = 2**self.bits - 1
        scale = alpha / n
        # divisions by the float32 scale, as ONNX's QuantizeLinear computes them (see deploy.onnx_export)
        return (odd_integers(clipped, scale) if self.signed else torch.round(clipped / scale)), scale


class PACTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_alpha: float = Field(10.0, gt=0)
    """Initial clipping level alpha of every activation quantizer."""
    alpha_decay: float | None = Field(None, ge=0)
    """L2 coefficient of alpha (the paper's lambda_alpha, applied as weight decay); None: the weight decay
    of the network the quantizer is in (the paper sets lambda_alpha = lambda); 0: none."""


@register_quantizer("pact")
class PACT(QuantizerFamily):
    """Learned-clip activations, DoReFa weights."""

    Options = PACTOptions
    revision = 2  # 1: alpha without decay

    def activation(self, bits: int, signed: bool) -> Quantizer:
        o = self.options
        return PACTQuantizer(bits, signed, init_alpha=o.init_alpha, alpha_decay=o.alpha_decay)

    def weight(self, bits: int) -> Quantizer:
        return DoReFaWeightQuantizer(bits)
