"""What a student costs: multiply-accumulates, bit-operations and bytes.

BOPs (bit-operations) = MACs x weight bits x activation bits, the measure quantization papers report;
the float version of the same network counts 32 x 32 per MAC. MACs are those of the layers the
quantize pass decides on (convolutions, linear layers, the projections of attention); the
activation-by-activation products inside attention are not counted. Sizes count every tensor
inference needs (parameters and BatchNorm statistics): float32 for the float model; the packed codes
plus float32 for everything else (and the scales) for the quantized one.
"""

from __future__ import annotations

import math
import operator

from torch import fx, nn

from cmtkd_graph.quantizers.attention import QUANTIZED_ATTENTION_TYPES
from cmtkd_graph.quantizers.base import FULL_PRECISION

FLOAT_BITS = 32


def node_macs(gm: fx.GraphModule, node: fx.Node, *, per_sample: bool = True) -> int:
    """MACs of one call of a conv/linear/attention layer for one image or clip (needs propagated
    shapes); ``per_sample=False``: for the whole batch of the call (a detector's RoI heads: one row per
    proposal)."""
    per_item = _item_macs(gm, node)
    return per_item if per_sample else per_item * _output_value(node).shape[0]


def _output_value(node: fx.Node):
    out = node.meta.get("val")
    if out is None:  # nn.MultiheadAttention returns (output, weights): the output's shape is its [0]'s
        first = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        out = first[0].meta.get("val") if first else None
    if out is None:
        raise ValueError(f"{node.target}: no propagated shape (run passes.shapes.propagate_shapes)")
    return out


def _item_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    module = gm.get_submodule(node.target)
    out, inp = _output_value(node), node.args[0].meta.get("val") if node.args else None
    batch = out.shape[0]
    if batch == 0:  # a head that ran on no rows (a detector's mask head without detections)
        return 0
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return out.numel() // batch * per_output
    if isinstance(module, nn.Linear):
        return out.numel() // batch * module.in_features
    if isinstance(module, nn.MultiheadAttention):
        tokens = out.numel() // batch // module.embed_dim
        return tokens * 4 * module.embed_dim * module.embed_dim  # q, k, v and output projections
    if isinstance(module, QUANTIZED_ATTENTION_TYPES) or hasattr(module, "qkv"):
        positions = inp.numel() // batch // module.qkv.in_features if inp is not None else 0
        dim = module.qkv.in_features
        return positions * (
            module.qkv.out_features * dim + module.proj.out_features * module.proj.in_features
        )
    raise ValueError(f"{node.target}: no MAC count for {type(module).__name__}")


def bops(macs: int, weight_bits: int, act_bits: int) -> int:
    return macs * min(weight_bits, FULL_PRECISION) * min(act_bits, FULL_PRECISION)


def float_bytes(numel: int) -> int:
    return numel * 4


def megabytes(n: int) -> float:
    """MiB, as model sizes are usually quoted (resnet18: 44.6)."""
    return n / 2**20


def human_bops(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"
