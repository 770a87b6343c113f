"""Facts several passes share: the node-meta key, finding layers and the output node, copying a
teacher's node into a combined graph, and the module names derived from tap names.

Kept here, in one place, so that no pass imports another pass only for a constant or a helper.
"""

from __future__ import annotations

import re

import torch
from cmtkd_graph.passes.tracer import qualname
from torch import fx, nn

META = "cmtkd"
"""``node.meta`` key holding what our passes decided about a node (role, bits, signedness...)."""

# Keys of the dicts our graphs return.
LOGITS = "logits"  # a network's (or the combined teacher's) logits
FEATURES = "features"  # tap features by tap name
EXTRAS = "extras"  # other named nodes a method asked for (e.g. AMTML-KD's last feature map)
EACH_LOGITS = "each_logits"  # every teacher's logits, in teacher order
SHARED = "shared"  # CMT-KD's shared knowledge by tap name
AUX = "aux"  # a network's auxiliary logits (a task's auxiliary head, e.g. segmentation's aux_loss)
EACH_AUX = "each_aux"  # every teacher's auxiliary logits, in teacher order (None: the teacher has none)


def quantizable_layer_types() -> tuple[type[nn.Module], ...]:
    """2-D and 3-D convs, linear and the attention modules torchvision runs functionally: the layers
    we quantize."""
    from cmtkd_graph.quantizers.attention import ATTENTION_TYPES

    return (nn.Conv2d, nn.Conv3d, nn.Linear, *ATTENTION_TYPES)


def find_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Call sites of conv/linear/attention modules, in execution order."""
    types = quantizable_layer_types()
    return [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types)
    ]


HOLDS = "cmtkd_holds"
"""``gm.meta`` key of the ends of its network a graph holds: ``{"first", "last"}`` (absent: both). A traced
part of a larger model (a detector's backbone holds the first layers, its predictors the last, its RPN's
first convolution is inner although no layer of that graph precedes it: ``cmtkd_graph.models.parts``)."""


def first_and_last_layers(gm: fx.GraphModule, layers: list[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Layers with no layer upstream (first) and with no layer downstream (last), by graph position; a
    graph that is a part of its network has only the ends it holds (``gm.meta[HOLDS]``)."""
    layer_set = set(layers)
    upstream: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        upstream[node] = any(p in layer_set or upstream[p] for p in node.all_input_nodes)
    downstream: dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        downstream[node] = any(u in layer_set or downstream[u] for u in node.users)
    holds = gm.meta.get(HOLDS, ("first", "last"))
    first = {n for n in layers if not upstream[n]} if "first" in holds else set()
    last = {n for n in layers if not downstream[n]} if "last" in holds else set()
    return first, last


def output_node(gm: fx.GraphModule) -> fx.Node:
    """The graph's ``output`` node (always the last one)."""
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def output_value(gm: fx.GraphModule):
    """What the graph returns: a node, or a dict / tuple of nodes."""
    return output_node(gm).args[0]


def network_outputs(value) -> tuple[fx.Node, fx.Node | None]:
    """The logits and the auxiliary logits (None: no auxiliary head kept) of what a network graph
    returns after ``keep_main_output``: the logits node, or ``{"logits": node, "aux": node}``."""
    if isinstance(value, dict) and LOGITS in value:
        return value[LOGITS], value.get(AUX)
    return value, None  # the logits, or a network's own dict of outputs (a detector backbone's maps)


def fusion_key(tap_name: str) -> str:
    """Module name derived from a tap name (``layer1.0.relu_1`` -> ``layer1_0_relu_1``)."""
    return re.sub(r"\W", "_", tap_name)


def find_node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node whose qualified name is ``name``."""
    for node in gm.graph.nodes:
        if qualname(node) == name:
            return node
    raise KeyError(name)


def copy_teacher_node(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node], k: int) -> fx.Node:
    """Copy one node of teacher ``k`` into ``graph``, its modules and attributes under ``teacher{k}.``."""
    args = fx.map_arg(node.args, env.__getitem__)
    kwargs = fx.map_arg(node.kwargs, env.__getitem__)
    target = f"teacher{k}.{node.target}" if node.op in ("call_module", "get_attr") else node.target
    new = graph.create_node(node.op, target, args, kwargs, name=f"teacher{k}_{node.name}")
    new.meta = dict(node.meta)
    new.meta["qualname"] = f"teacher{k}.{qualname(node)}"
    new.meta[META] = {**node.meta.get(META, {}), "teacher": k}
    new.meta[META].setdefault("role", "teacher")
    return new


def to_nchw(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A node moving the channels of a channels-last map (Swin's [B, H, W, C] stages, Video Swin's
    [B, T, H, W, C]) to axis 1, as every loss expects.

    Inserted at the graph's current insertion point; the original node is left as it is."""
    permuted = graph.call_function(torch.movedim, (node, -1, 1))
    permuted.meta["qualname"] = f"{node.meta.get('qualname', node.name)}.to_nchw"
    return permuted
