"""Per-layer precision rules: which bits (and quantizer) each conv/linear/attention layer gets.

In the spirit of torch.ao's ``QConfigMapping``, a rule matches layers by what they are and says what
they get. The quantize pass (``passes/quantize.py``) asks :func:`decide` for every layer, in this order:

1. the spec's ``quantizer.rules``, in order: the first rule whose every selector matches decides;
   the bits it leaves out are the ones the layer would get without it;
2. the first/last-layer rule (``quantizer.first_layer_bits`` / ``last_layer_bits``, by graph
   position);
3. the network's own ``weight_bits`` / ``act_bits``.

Selectors (``LayerFacts`` of a layer):

* ``type``: a class name of the float module or of any of its bases (``Conv2d``, ``Linear``,
  ``MultiheadAttention``; ``Conv3d`` also matches torchvision's ``Conv3DSimple``, a subclass);
* ``name``: a glob on the layer's name or on any dotted prefix of it (``features.*.block.1``,
  ``encoder.layers.encoder_layer_0``);
* ``position``: ``first`` (no layer upstream), ``last`` (no layer downstream) or ``inner``;
* ``role`` (:data:`ROLES`): ``depthwise_conv`` (groups = input channels > 1), ``attention`` (an
  attention module's projections: ViT's and Swin's attention modules, and linear layers inside a
  module whose class name ends in ``Attention``: MViT, MaxViT), ``se_gate`` (the layers of a
  squeeze-excitation block: MobileNetV3, EfficientNet, RegNetY), ``patch_embedding`` (a first layer
  that is a convolution with stride >= 4 in every spatial axis: ViT, Swin, ConvNeXt, MViT stems;
  ResNet's 7x7/2 stem is not one), ``classifier`` (the last layer(s): the same layers as
  ``position: last``);
* ``network``: ``student`` or ``teacher`` (every network when absent).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from cmtkd_graph.passes.common import find_layers, first_and_last_layers
from cmtkd_graph.passes.tracer import qualname
from torch import fx, nn

from cmtkd_graph.quantizers import QuantizerFamily
from cmtkd_graph.quantizers.attention import ATTENTION_TYPES

ROLES = ("depthwise_conv", "attention", "se_gate", "patch_embedding", "classifier")
POSITIONS = ("first", "last", "inner")
NETWORKS = ("student", "teacher")
PATCH_STRIDE = 4
"""The least stride (in every spatial axis) of a first convolution that embeds patches."""


@dataclass(frozen=True)
class LayerFacts:
    """What rules can select a layer by."""

    name: str
    types: tuple[str, ...]  # the float module's class and its bases, by name
    position: str  # first, last or inner
    roles: tuple[str, ...]
    network: str  # student or teacher


@dataclass(frozen=True)
class LayerRule:
    """One rule of the spec's ``quantizer.rules`` (``label`` names it: ``quantizer.rules[0]``). A
    selector left None matches every layer; a bit-width left None keeps what the layer gets otherwise;
    ``family`` None keeps the network's quantizer family."""

    label: str
    type: str | None = None
    name: str | None = None
    position: str | None = None
    role: str | None = None
    network: str | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    family: QuantizerFamily | None = field(default=None, compare=False)

    def matches(self, facts: LayerFacts) -> bool:
        return (
            (self.type is None or self.type in facts.types)
            and (self.name is None or _name_matches(self.name, facts.name))
            and (self.position is None or self.position == facts.position)
            and (self.role is None or self.role in facts.roles)
            and (self.network is None or self.network == facts.network)
        )

    @property
    def selectors(self) -> str:
        """``role depthwise_conv, network student``: what the rule matches, in words."""
        chosen = (
            ("type", self.type),
            ("name", self.name),
            ("position", self.position),
            ("role", self.role),
            ("network", self.network),
        )
        return ", ".join(f"{key} {value}" for key, value in chosen if value is not None)


def _name_matches(pattern: str, name: str) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def layer_facts(gm: fx.GraphModule, network: str) -> dict[fx.Node, LayerFacts]:
    """The facts of every layer of ``gm`` (a network's float graph), by its call site."""
    layers = find_layers(gm)
    first, last = first_and_last_layers(gm, layers)
    facts = {}
    for node in layers:
        module = gm.get_submodule(node.target)
        position = "first" if node in first else "last" if node in last else "inner"
        facts[node] = LayerFacts(
            name=qualname(node),
            types=tuple(cls.__name__ for cls in type(module).__mro__),
            position=position,
            roles=_roles(node, module, position),
            network=network,
        )
    return facts


def _roles(node: fx.Node, module: nn.Module, position: str) -> tuple[str, ...]:
    scopes = [_type_name(t) for _, t in node.meta.get("nn_module_stack", {}).values()][:-1]  # enclosing
    convolution = isinstance(module, nn.Conv2d | nn.Conv3d)
    roles = []
    if convolution and module.groups > 1 and module.groups == module.in_channels:
        roles.append("depthwise_conv")
    if isinstance(module, ATTENTION_TYPES) or (
        isinstance(module, nn.Linear) and any(s.endswith("Attention") for s in scopes)
    ):
        roles.append("attention")
    if any("SqueezeExcitation" in s for s in scopes):
        roles.append("se_gate")
    if position == "first" and convolution and min(module.stride) >= PATCH_STRIDE:
        roles.append("patch_embedding")
    if position == "last":
        roles.append("classifier")
    return tuple(roles)


def _type_name(t) -> str:
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1].strip("'>")


@dataclass(frozen=True)
class Decision:
    """A layer's bits and quantizer family, and what decided them (``node.meta`` keeps it)."""

    weight_bits: int
    act_bits: int
    family: QuantizerFamily
    rule: str  # quantizer.rules[i] (...), the first/last-layer rule, or the network's bits
    rule_label: str | None = None  # the deciding rule's label (quantizer.rules[i]); None: no rule


def decide(
    facts: LayerFacts,
    rules: Sequence[LayerRule],
    family: QuantizerFamily,
    *,
    weight_bits: int,
    act_bits: int,
    first_layer_bits: int,
    last_layer_bits: int,
) -> Decision:
    """The bits and family of one layer (see the module docstring for the order)."""
    if facts.position in ("first", "last"):
        bits = first_layer_bits if facts.position == "first" else last_layer_bits
        default = Decision(bits, bits, family, f"{facts.position}-layer rule")
    else:
        default = Decision(weight_bits, act_bits, family, "network bits")
    for rule in rules:
        if rule.matches(facts):
            return Decision(
                default.weight_bits if rule.weight_bits is None else rule.weight_bits,
                default.act_bits if rule.act_bits is None else rule.act_bits,
                rule.family or family,
                f"{rule.label} ({rule.selectors})",
                rule.label,
            )
    return default


__all__ = ["NETWORKS", "POSITIONS", "ROLES", "Decision", "LayerFacts", "LayerRule", "decide", "layer_facts"]
