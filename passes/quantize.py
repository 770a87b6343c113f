"""The pass that quantizes a traced model: quantized conv/linear layers + input quantizers.

For one model and its bit-widths (docs/methods.md#quantizers):

* every ``nn.Conv2d`` / ``nn.Conv3d`` / ``nn.Linear`` call becomes a ``QuantConv2d`` / ``QuantConv3d``
  / ``QuantLinear`` whose
  ``weight``/``bias`` keep their names (``layer1.0.conv1.weight``), so float checkpoints still load;
* attention modules whose projections torchvision runs functionally (``nn.MultiheadAttention`` in ViT,
  ``ShiftedWindowAttention(V2)`` in Swin) are layers too: each call becomes a quantized twin
  (``cmtkd_graph.quantizers.attention``) that quantizes the projection weights and the input of the
  output projection inside; its input is quantized by a node like any layer's;
* an activation quantizer node is inserted on the input edge of each quantized layer, stored as the
  layer's child ``input_quantizer`` (state dict ``layer1.0.conv1.input_quantizer.*``), unsigned when
  the producer is non-negative (ReLU-like, possibly through pooling/reshaping), signed otherwise;
* the first layer(s) (no conv/linear upstream) and the last layer(s) (no conv/linear downstream) are
  found by graph position, not by name, and get ``first_layer_bits`` / ``last_layer_bits``
  (32 = stay float, the paper's rule);
* precision ``rules`` (``passes/precision.py``: by module type, name, position, role) come before
  both and may set any layer's bits or quantizer family;
* BatchNorm stays unfolded, residual adds and concatenations stay float.

Each layer node records its decision in ``node.meta["cmtkd"]`` (bits, position, roles and the rule that
decided) and each quantizer node its bits and signedness, for ``cmtkd-graph inspect``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.graph_pass import graph_pass
from cmtkd_graph.passes.precision import Decision, LayerRule, decide, layer_facts
from cmtkd_graph.passes.tracer import qualname, replace_submodule, target_qualname, unique_target
from torch import fx, nn

from cmtkd_graph.quantizers import FULL_PRECISION, QuantizerFamily
from cmtkd_graph.quantizers.attention import ATTENTION_TYPES, QUANTIZED_ATTENTION_TYPES, quantize_attention
from cmtkd_graph.quantizers.layers import QUANTIZED_CONVS, QuantLinear, quantized_conv


@dataclass(frozen=True)
class LayerBits:
    weight: int
    act: int


@graph_pass
def quantize(
    gm: fx.GraphModule,
    family: QuantizerFamily,
    *,
    weight_bits: int,
    act_bits: int,
    first_layer_bits: int = FULL_PRECISION,
    last_layer_bits: int = FULL_PRECISION,
    rules: Sequence[LayerRule] = (),
    network: str = "student",
) -> None:
    """Quantized layers and input quantizers (see module docstring); ``quantize(gm)`` returns a copy.
    ``network`` (student or teacher) is what a rule's ``network`` selector compares with."""
    nonneg = nonnegative_nodes(gm)
    for node, facts in layer_facts(gm, network).items():
        decision = decide(
            facts,
            rules,
            family,
            weight_bits=weight_bits,
            act_bits=act_bits,
            first_layer_bits=first_layer_bits,
            last_layer_bits=last_layer_bits,
        )
        bits = LayerBits(decision.weight_bits, decision.act_bits)
        quantized = _quantized_layer(gm.get_submodule(node.target), decision.family, bits)
        if quantized is not None:
            replace_submodule(gm, node.target, quantized)
        node.meta[META] = {
            "role": "layer",
            "position": facts.position,
            "roles": list(facts.roles),
            "weight_bits": bits.weight,
            "act_bits": bits.act,
            "quantizer": decision.family.name,
            "rule": decision.rule,
            "rule_label": decision.rule_label,  # None unless one of the spec's rules decided
            "reason": _reason(facts.position, bits, decision),
        }
        if bits.act != FULL_PRECISION:
            _insert_input_quantizer(gm, node, decision.family, bits.act, signed=node.args[0] not in nonneg)


def _reason(position: str, bits: LayerBits, decision: Decision) -> str:
    if decision.rule_label is not None:
        kept = bits.weight == bits.act == FULL_PRECISION
        return f"{'kept full precision' if kept else 'set'} by {decision.rule}"
    if bits.weight == FULL_PRECISION and bits.act == FULL_PRECISION:
        return f"{position} layer kept full precision" if position != "inner" else "32-bit model"
    return f"{position} layer quantized"


def _quantized_layer(module: nn.Module, family: QuantizerFamily, bits: LayerBits) -> nn.Module | None:
    """The quantized twin of a float layer, or None when it stays as it is."""
    if isinstance(module, (*QUANTIZED_CONVS.values(), QuantLinear, *QUANTIZED_ATTENTION_TYPES)):
        return None  # a layer called at several sites is swapped once
    if isinstance(module, ATTENTION_TYPES):
        # it quantizes an activation inside (the output projection's input), so W32Ab swaps it too
        if bits.weight == bits.act == FULL_PRECISION:
            return None
        return quantize_attention(module, family, weight_bits=bits.weight, act_bits=bits.act)
    if bits.weight == FULL_PRECISION:
        return None
    if isinstance(module, tuple(QUANTIZED_CONVS)):
        return quantized_conv(module, family.weight(bits.weight))
    return QuantLinear.from_float(module, family.weight(bits.weight))


def _insert_input_quantizer(
    gm: fx.GraphModule, layer: fx.Node, family: QuantizerFamily, bits: int, *, signed: bool
) -> None:
    source = layer.args[0]
    target = unique_target(gm, f"{layer.target}.input_quantizer")
    gm.add_submodule(target, family.activation(bits, signed))
    with gm.graph.inserting_before(layer):
        quant = gm.graph.call_module(target, (source,))
    quant.meta = {
        "qualname": target_qualname(gm, target),
        "nn_module_stack": layer.meta.get("nn_module_stack", {}),
        META: {
            "role": "quantizer",
            "kind": "activation",
            "bits": bits,
            "signed": signed,
            "quantizer": family.name,
            "consumer": qualname(layer),
            "producer": qualname(source) if isinstance(source, fx.Node) else None,
        },
    }
    layer.replace_input_with(source, quant)  # every use: self-attention takes it as query, key and value


# Outputs that are >= 0 whatever the input.
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NONNEG_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    torch.sigmoid,
    F.sigmoid,
    F.softmax,
    torch.softmax,
    F.hardsigmoid,
}
# Outputs that are >= 0 when every tensor input is (pooling, reshaping, selecting, joining, scaling).
_PRESERVING_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.ChannelShuffle,
    nn.Upsample,
)
_PRESERVING_FUNCTIONS = {
    torch.flatten,
    torch.cat,
    torch.stack,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    operator.getitem,
    operator.add,
    operator.mul,
    torch.add,
    torch.mul,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.max_pool3d,
    F.avg_pool3d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool3d,
    F.dropout,
    torch.mean,
    torch.narrow,
    torch.chunk,
    torch.split,
    F.interpolate,
}
_PRESERVING_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "mean",
    "chunk",
    "split",
    "expand",
    "add",
    "mul",
    "__getitem__",
}


def nonnegative_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose output is provably >= 0 (so an unsigned quantizer loses nothing)."""
    nonneg: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        inputs_nonneg = bool(inputs) and all(i in nonneg for i in inputs)
        if _always_nonnegative(gm, node) or (inputs_nonneg and _preserves_sign(gm, node)):
            nonneg.add(node)
    return nonneg


def _always_nonnegative(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _NONNEG_MODULES) or (
            isinstance(module, nn.Hardtanh) and module.min_val >= 0
        )
    return node.op == "call_function" and node.target in _NONNEG_FUNCTIONS


def _preserves_sign(gm: fx.GraphModule, node: fx.Node) -> bool:
    from cmtkd_graph.quantizers import Quantizer

    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _PRESERVING_MODULES) or (
            isinstance(module, Quantizer) and not module.signed
        )
    if node.op == "call_function":
        negative_constant = any(isinstance(a, int | float) and a < 0 for a in node.args)
        return node.target in _PRESERVING_FUNCTIONS and not negative_constant
    return node.op == "call_method" and node.target in _PRESERVING_METHODS
