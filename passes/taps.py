"""Taps: the nodes whose features are fused across teachers and distilled into the student.

A tap name is resolved against a traced graph as, in this order:

1. an exact node name (``layer1.0.relu_1``, torchvision feature-extraction naming) or FX node name;
2. a module prefix (``layer1``): the last node inside that module in execution order, as
   ``torchvision.models.feature_extraction.create_feature_extractor`` does;
3. otherwise an error listing the closest valid names.

``auto`` is the paper's "end of every convolution block / stage", by the architecture family's row in
``cmtkd_graph.models.facts`` (ResNet / ResNeXt / Wide-ResNet ``layer1`` .. ``layer4``; ViT the encoder
blocks at 1/4, 1/2, 3/4 and full depth; Swin its four stages, whose NHWC maps are exposed as NCHW), and
for every other model (AlexNet, VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet, RegNet, ...) the
generic rule: the last node at each spatial resolution (larger than 1x1), among the nodes every
input-to-output path passes through (so nothing inside a residual block), in stages that contain a conv
layer, read at the builders' own 224x224 whatever the data's size (the same taps at 32 and at 224 px).
For AlexNet that is the end of its three conv blocks, for VGG the five blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cmtkd_graph.passes.common import META, find_layers, network_outputs, output_value
from cmtkd_graph.passes.shapes import propagate_shapes, shape_of
from cmtkd_graph.passes.tracer import copy_graph_module, qualname
from torch import fx

from cmtkd_graph.errors import UserError, closest
from cmtkd_graph.models.facts import BlocksAtDepth, FixedTaps, family_of

AUTO = "auto"


@dataclass(frozen=True)
class Tap:
    """A resolved tap: the user-facing ``name``, the graph ``node`` and its output ``shape`` (no batch)."""

    name: str
    node: str
    shape: tuple[int, ...] | None
    channels_last: bool = False


def tappable_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that may be taps: computed tensors, excluding quantizers and fusion nodes."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.meta.get(META, {}).get("role") in ("quantizer", "fusion"):
            continue
        out.append(node)
    return out


def resolve_tap(gm: fx.GraphModule, name: str, *, model: str = "model") -> fx.Node:
    """The node a tap name refers to (see the module docstring), or a UserError with close names."""
    nodes = tappable_nodes(gm)
    for node in nodes:
        if qualname(node) == name or node.name == name:
            return node
    inside = [n for n in nodes if qualname(n).startswith(name + ".")]
    if inside:
        return inside[-1]
    candidates = [qualname(n) for n in nodes] + sorted(module_prefixes(gm))
    near = closest(name, candidates, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(near)}" if near else ""
    raise UserError(
        f"taps: {name!r} is neither a node nor a module of {model}{hint} "
        f"(list them with `cmtkd-graph taps ARCH`)"
    )


def module_prefixes(gm: fx.GraphModule) -> set[str]:
    """Every module path that contains at least one tappable node (``layer1``, ``layer1.0``...)."""
    out: set[str] = set()
    for node in tappable_nodes(gm):
        parts = qualname(node).split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def auto_tap_names(gm: fx.GraphModule, arch: str) -> list[str]:
    """The ``auto`` tap names for ``arch``: its family's rule (``cmtkd_graph.models.facts``); shapes must
    have been propagated for the generic one."""
    rule = family_of(arch).auto_taps
    if isinstance(rule, FixedTaps):
        return list(rule.names)
    if isinstance(rule, BlocksAtDepth):
        prefix = rule.container + "."
        inside = [qualname(n)[len(prefix) :] for n in tappable_nodes(gm) if qualname(n).startswith(prefix)]
        depth = len({name.split(".")[0] for name in inside})
        picks = sorted({max(0, round(depth * f) - 1) for f in rule.fractions})
        return [rule.template.format(i=i) for i in picks]
    return _stage_ends(_at_reference_size(gm))


REFERENCE_SIZE = (224, 224)
"""The image size the generic rule reads a network's stages at: the builders' own (ImageNet) size, so
that the taps follow the network's structure, not the data's size (at 32x32 the last stage of a
MobileNet or an EfficientNet is a 1x1 map, where no resolution drops)."""


def _at_reference_size(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with shapes for an image of :data:`REFERENCE_SIZE` (a meta copy where the data's size
    differs; ``gm`` itself where it is the same, or is not an image network, or does not run at it)."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    shape = shape_of(placeholder)
    if shape is None or len(shape) != 4 or tuple(shape[2:]) == REFERENCE_SIZE:
        return gm
    shadow = copy_graph_module(gm, tensors="meta")
    try:
        propagate_shapes(shadow, (1, shape[1], *REFERENCE_SIZE))
    except UserError:  # a network built for one other size (MaxViT's input_size): its own shapes
        return gm
    return shadow


def _stage_ends(gm: fx.GraphModule) -> list[str]:
    """The output of every stage: for each point where the main path's resolution drops, the end of the
    module that runs just before the downsampling module starts (see :func:`_boundary_before`)."""
    nodes = list(gm.graph.nodes)
    rank = len(shape_of(next(n for n in nodes if n.op == "placeholder")) or (0, 0, 0, 0))  # 5: clips
    on_every_path = _cut_nodes(gm)
    cut = [n for n in nodes if n in on_every_path and n.op != "placeholder" and shape_of(n) is not None]
    layer_sizes = {_resolution(n, rank) for n in find_layers(gm)} - {None}
    ends: list[fx.Node] = []
    size: tuple[int, ...] | None = None
    for node in cut:
        here = _resolution(node, rank)
        if size is None:
            size = here if here is not None and math.prod(here) > 1 else None
            continue
        shrinks = here is None or (here != size and all(h <= s for h, s in zip(here, size, strict=True)))
        if not shrinks:
            continue  # same size, or a reshaped/channels-last view (e.g. ConvNeXt's LayerNorm2d)
        end = _boundary_before(node, cut, nodes, size, rank)
        if end is not None and size in layer_sizes and end not in ends:
            ends.append(end)
        size = here if here is not None and math.prod(here) > 1 else None
    return [qualname(n) for n in ends]


def _resolution(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The spatial (and time) size of a map of the input's ``rank`` ([B, C, H, W], clips [B, C, T, H, W])."""
    shape = shape_of(node)
    return tuple(shape[2:]) if shape is not None and len(shape) == rank else None


def _boundary_before(
    down: fx.Node, cut: list[fx.Node], nodes: list[fx.Node], size: tuple[int, ...], rank: int
) -> fx.Node | None:
    """The last main-path node before the outermost module that contains the downsampling node ``down``
    and starts at resolution ``size`` (e.g. before ``layer2`` in a ResNet, before ``features.2`` in a
    MobileNet whose stride-2 conv sits inside ``features.2``)."""
    order = {n: i for i, n in enumerate(nodes)}
    parts = qualname(down).split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        start = next(n for n in nodes if qualname(n) == prefix or qualname(n).startswith(prefix + "."))
        before = [c for c in cut if order[c] < order[start]]
        if before and _resolution(before[-1], rank) == size:
            return before[-1]
    same = [c for c in cut if order[c] < order[down] and _resolution(c, rank) == size]
    return same[-1] if same else None


def _cut_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes on every path from the input to the output (no data edge jumps over them).

    In a topological order, a path can avoid node v only through an edge from before v to after v;
    edges from parameters/constants (not reachable from the input) do not count.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    from_input: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(i in from_input for i in n.all_input_nodes):
            from_input.add(n)
    cut, reach = set(), -1
    for i, n in enumerate(nodes):
        if n in from_input and reach <= i:
            cut.add(n)
        if n in from_input and n.users:
            reach = max(reach, max(pos[u] for u in n.users))
    return cut


def resolve_taps(
    gm: fx.GraphModule, names: Sequence[str] | str, *, arch: str, model: str = "model"
) -> list[Tap]:
    """Resolve tap names (or ``auto``) into :class:`Tap` records, in execution order of the graph."""
    if names == AUTO:
        names = auto_tap_names(gm, arch)
        if not names:
            raise UserError(
                f"taps: the auto rule found no stage ends in {model} ({arch}); list taps explicitly"
            )
    taps = []
    channels_last = family_of(arch).channels_last_features
    for name in names:
        node = resolve_tap(gm, name, model=model)
        shape = shape_of(node)
        if shape is not None and channels_last and len(shape) >= 4:  # [B, (T,) H, W, C] -> [B, C, (T,) H, W]
            shape = (shape[0], shape[-1], *shape[1:-1])
        taps.append(Tap(name, qualname(node), shape[1:] if shape else None, channels_last))
    order = {qualname(n): i for i, n in enumerate(gm.graph.nodes)}
    positions = [order[t.node] for t in taps]
    if positions != sorted(positions) or len(set(positions)) != len(positions):
        raise UserError(
            f"taps of {model} must be distinct and in execution order; got "
            + ", ".join(f"{t.name} (node {t.node})" for t in taps)
        )
    return taps


def last_feature_map(gm: fx.GraphModule) -> str:
    """The last feature map before the classifier head (shapes must have been propagated).

    Walks back from the logits through vector-valued nodes (linear layers, flatten, dropout) and the
    global pooling that turned the map into a vector: ResNet's ``layer4`` output, EfficientNet's
    ``features`` output, ViT's final token features. AMTML-KD reads the student's instance features
    there.
    """
    node, _ = network_outputs(output_value(gm))
    while True:
        inputs = [i for i in node.all_input_nodes if shape_of(i) is not None and i.op != "get_attr"]
        shape = shape_of(node)
        if shape is not None and len(shape) >= 3 and not _is_global_pool(node, inputs):
            return qualname(node)
        if not inputs:
            raise UserError(f"no feature map found before the logits (stopped at {qualname(node)})")
        node = inputs[0]


def _is_global_pool(node: fx.Node, inputs: list[fx.Node]) -> bool:
    """Adaptive pooling before a classifier (VGG's 7x7), or a 1x1 (1x1x1) map made from a larger map
    with the same channels (global average / max pooling)."""
    if _is_adaptive_pool(node):
        return True
    shape = shape_of(node)
    if len(shape) not in (4, 5) or math.prod(shape[2:]) != 1 or len(inputs) != 1:
        return False
    before = shape_of(inputs[0])
    return len(before) == len(shape) and before[1] == shape[1] and math.prod(before[2:]) > 1


def _is_adaptive_pool(node: fx.Node) -> bool:
    import torch.nn.functional as F
    from torch import nn

    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        adaptive = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
        return isinstance(module, adaptive)
    return node.op == "call_function" and node.target in (
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool3d,
    )
