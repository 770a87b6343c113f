"""Quantizers (HWGQ, LSQ, DoReFa, PACT) and the quantized conv/linear layers the FX pass swaps in.

Importing this package registers every built-in family in ``QUANTIZERS``.
"""

from cmtkd_graph.quantizers.base import (
    FULL_PRECISION,
    QUANTIZERS,
    Quantizer,
    QuantizerFamily,
    build_quantizer_family,
    register_quantizer,
)
from cmtkd_graph.quantizers.dorefa import DoReFa
from cmtkd_graph.quantizers.hwgq import HWGQ
from cmtkd_graph.quantizers.layers import QuantConv2d, QuantConv3d, QuantLinear
from cmtkd_graph.quantizers.lsq import LSQ
from cmtkd_graph.quantizers.pact import PACT

__all__ = [
    "FULL_PRECISION",
    "HWGQ",
    "LSQ",
    "PACT",
    "QUANTIZERS",
    "DoReFa",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "Quantizer",
    "QuantizerFamily",
    "build_quantizer_family",
    "register_quantizer",
]
