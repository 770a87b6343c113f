"""What every quantizer family provides: weight and activation quantizers for a bit-width.

A *quantizer* is an ``nn.Module`` mapping a tensor to a finite set of levels (forward) with a
straight-through estimate of the gradient (backward). A *quantizer family* (HWGQ, LSQ, ...)
is registered by name in ``QUANTIZERS`` and builds the quantizers the FX pass inserts:
one activation quantizer per input edge of a quantized layer and one weight quantizer per layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from cmtkd_graph.errors import SpecError
from cmtkd_graph.registry import Registry

FULL_PRECISION = 32


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
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            # Nothing is computed on the meta device (structure and shape checks of whole systems),
            # and levels have the input's shape and dtype: skip the elementwise work, which is slow there.
            return x
        dtype = x.dtype
        return self.quantize(x.float()).to(dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class NoOptions(BaseModel):
    """Options model for families that take none."""

    model_config = ConfigDict(extra="forbid")


class QuantizerFamily:
    """A named quantization scheme: builds weight and activation quantizers.

    ``Options`` is a pydantic model validating the spec's ``quantizer.options`` mapping.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    def activation(self, bits: int, signed: bool) -> Quantizer:
        """Quantizer for a layer's input; ``signed`` when the producer can be negative."""
        raise NotImplementedError

    def weight(self, bits: int) -> Quantizer:
        """Quantizer for a conv/linear weight (output channels on dim 0)."""
        raise NotImplementedError


QUANTIZERS: Registry[type[QuantizerFamily]] = Registry("quantizer")


def register_quantizer(name: str):
    """Class decorator: ``@register_quantizer("hwgq") class HWGQ(QuantizerFamily): ...``."""

    def add(cls: type[QuantizerFamily]) -> type[QuantizerFamily]:
        cls.name = name
        return QUANTIZERS.register(name)(cls)

    return add


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
