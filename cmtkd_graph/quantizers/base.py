"""What every quantizer family provides: weight and activation quantizers for a bit-width.

A *quantizer* is an ``nn.Module`` mapping a tensor to a finite set of levels (forward) with a
straight-through estimate of the gradient (backward). A *quantizer family* (HWGQ, LSQ, ...)
is registered by name in ``QUANTIZERS`` and builds the quantizers the FX pass inserts:
one activation quantizer per input edge of a quantized layer and one weight quantizer per layer.

Every quantizer's levels are integers times a scale (:class:`IntegerGrid`): ``to_integers`` gives
them, and the fake-quantized forward is computed as exactly ``q * scale``, so exported integer codes
decode to the trained model's values bit for bit (``cmtkd_graph.deploy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from cmtkd_graph.errors import SpecError
from cmtkd_graph.registry import QUANTIZERS

FULL_PRECISION = 32


@dataclass(frozen=True)
class IntegerGrid:
    """A quantizer's integers: level = scale * q with q = step * code + offset, code = 0 .. 2^bits - 1.

    ``code`` is what is stored (unsigned, ``bits`` wide, packed); ``q`` is the integer the arithmetic
    uses. ``step`` is 1 for grids with a zero level and 2 for mid-rise grids, whose levels are the odd
    multiples of scale (HWGQ weights, DoReFa/PACT signed, binary): they have no zero level.
    """

    bits: int
    step: int
    offset: int

    @property
    def qmin(self) -> int:
        return self.offset

    @property
    def qmax(self) -> int:
        return self.step * (2**self.bits - 1) + self.offset

    def codes(self, q: torch.Tensor) -> torch.Tensor:
        """uint8 codes of the integers ``q`` (which must lie on this grid)."""
        return ((q.to(torch.int32) - self.offset) // self.step).to(torch.uint8)

    def integers(self, codes: torch.Tensor) -> torch.Tensor:
        """int32 integers of ``codes``."""
        return codes.to(torch.int32) * self.step + self.offset


@dataclass(frozen=True)
class IntegerTensor:
    """A quantized tensor as integers: ``q`` (float32 holding integers) times ``scale``.

    ``scale`` is a 0-dim tensor, or per output channel with shape (C, 1, ...) for weights.
    """

    q: torch.Tensor
    scale: torch.Tensor
    grid: IntegerGrid

    def dequantize(self) -> torch.Tensor:
        """The fake-quantized values, bit for bit what the quantizer's forward returns."""
        return self.q * self.scale

    def codes(self) -> torch.Tensor:
        return self.grid.codes(self.q)


def odd_integers(x: torch.Tensor, half: torch.Tensor | float) -> torch.Tensor:
    """The odd integer nearest to x / half (x clipped to the grid): 2 round((x - half) / (2 half)) + 1.

    Written as the ONNX export computes a mid-rise grid (Sub, then QuantizeLinear with scale 2 half), so
    exported models round exactly as the fake-quantized ones.
    """
    return torch.sub(x, half).div_(2 * half).round_().mul_(2).add_(1)  # one full-size allocation


def unsigned_grid(bits: int) -> IntegerGrid:
    """Levels 0, s, ..., (2^b - 1) s."""
    return IntegerGrid(bits, 1, 0)


def twos_complement_grid(bits: int) -> IntegerGrid:
    """Levels -2^(b-1) s, ..., (2^(b-1) - 1) s."""
    return IntegerGrid(bits, 1, -(2 ** (bits - 1)))


def mid_rise_grid(bits: int) -> IntegerGrid:
    """Levels +-s, +-3s, ..., +-(2^b - 1) s: 2^b odd integers, no zero level."""
    return IntegerGrid(bits, 2, -(2**bits - 1))


class Quantizer(nn.Module):
    """Base class of all quantizers.

    Subclasses implement :meth:`quantize` on a float32 tensor; :meth:`forward` upcasts the input
    (mixed precision would otherwise round the levels) and returns the input's dtype.
    On the meta device a quantizer passes its input through (shape and dtype are what matter there).
    """

    def __init__(self, bits: int, signed: bool):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"quantizer bits must be 1..8, got {bits}")
        self.bits = bits
        self.signed = signed

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized float32 ``x`` with the straight-through gradient; its values are
        ``to_integers(x).dequantize()`` exactly."""
        raise NotImplementedError

    @property
    def grid(self) -> IntegerGrid:
        """How this quantizer's levels map to integers and stored codes."""
        raise NotImplementedError

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale) of float32 ``x``, without gradient: q holds integers on ``grid``."""
        raise NotImplementedError

    @torch.no_grad()
    def to_integers(self, x: torch.Tensor) -> IntegerTensor:
        """``x`` quantized, as integers and a scale (export, integer inference)."""
        q, scale = self.integers(x.detach().float())
        return IntegerTensor(q, scale, self.grid)

    def parameter_decay(self, weight_decay: float) -> float:
        """The L2 coefficient of this quantizer's learned parameters, given the weight decay of the network
        it quantizes: none by default (a learned step is not pulled towards 0)."""
        return 0.0

    def input_scale(self) -> torch.Tensor:
        """The scale of an activation quantizer, which does not depend on its input."""
        return self.integers(torch.zeros((), device=_device_of(self)))[1].reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            # Nothing is computed on the meta device (structure and shape checks of whole systems),
            # and levels have the input's shape and dtype: skip the elementwise work, which is slow there.
            return x
        dtype = x.dtype
        return self.quantize(x.float()).to(dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class NoOptions(BaseModel):
    """Options model for families that take none."""

    model_config = ConfigDict(extra="forbid")


class QuantizerFamily:
    """A named quantization scheme: builds weight and activation quantizers.

    ``Options`` is a pydantic model validating the spec's ``quantizer.options`` mapping.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    revision: ClassVar[int] = 1
    """Raised when what the family computes for the same spec changes (runs trained before become stale)."""

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    def activation(self, bits: int, signed: bool) -> Quantizer:
        """Quantizer for a layer's input; ``signed`` when the producer can be negative."""
        raise NotImplementedError

    def weight(self, bits: int) -> Quantizer:
        """Quantizer for a conv/linear weight (output channels on dim 0)."""
        raise NotImplementedError


def register_quantizer(name: str):
    """Class decorator: ``@register_quantizer("hwgq") class HWGQ(QuantizerFamily): ...``."""
    return QUANTIZERS.register_record(name)


def build_quantizer_family(name: str, options: dict[str, Any] | None = None) -> QuantizerFamily:
    """Instantiate a registered family, validating its options (errors name the option key)."""
    cls = QUANTIZERS.get(name)
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as err:
        raise SpecError(
            [
                f"quantizer.options.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                if e["loc"]
                else f"quantizer.options: {e['msg']}"
                for e in err.errors()
            ]
        ) from None
    return cls(opts)
