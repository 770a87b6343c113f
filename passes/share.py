"""Sharing a layer between two networks: the second uses the first's parameters (one tensor, trained
by both networks' losses).

CTKD's released code runs its scratch teacher and its student on one stem convolution
(docs/methods.md#ctkd); :func:`share_first_layer` does that for any two traced networks whose first
layers agree. Only the latent (float) weight and bias are shared: each network keeps its own weight
quantizer, so a layer quantized differently in the two networks still reads one set of weights.
"""

from __future__ import annotations

from cmtkd_graph.passes.common import find_layers, first_and_last_layers
from torch import fx, nn


def share_first_layer_in_place(
    source: fx.GraphModule, target: fx.GraphModule, names: tuple[str, str] = ("source", "target")
) -> str:
    """Make ``target``'s first layer use ``source``'s weight and bias (the same ``nn.Parameter``s).

    Returns one line saying what was shared, or why nothing was (``names``: what to call the two
    networks in it): two networks share a first layer only when each has exactly one (by graph
    position) and both are convolutions or linear layers of the same parameter shapes.
    """
    first = [_only_first_layer(gm) for gm in (source, target)]
    if None in first:
        return f"first layer not shared: the {names[0]} or the {names[1]} has no single first conv or linear"
    (s_name, s_layer), (t_name, t_layer) = first
    if type(s_layer.weight) is not nn.Parameter or type(t_layer.weight) is not nn.Parameter:
        return "first layer not shared: it has no plain weight parameter"
    shapes = [(m.weight.shape, None if m.bias is None else m.bias.shape) for m in (s_layer, t_layer)]
    if shapes[0] != shapes[1]:
        return (
            f"first layer not shared: the {names[0]}'s {s_name} weight {list(shapes[0][0])} and the "
            f"{names[1]}'s {t_name} weight {list(shapes[1][0])} differ"
        )
    t_layer.weight = s_layer.weight
    if s_layer.bias is not None:
        t_layer.bias = s_layer.bias
    what = "weight and bias" if s_layer.bias is not None else "weight"
    return f"first layer shared: the {names[1]}'s {t_name} computes with the {names[0]}'s {s_name} {what}"


def _only_first_layer(gm: fx.GraphModule) -> tuple[str, nn.Module] | None:
    layers = find_layers(gm)
    first, _ = first_and_last_layers(gm, layers)
    if len(first) != 1:
        return None
    (node,) = first
    module = gm.get_submodule(node.target)
    called_once = sum(n.target == node.target for n in layers) == 1
    if not isinstance(module, nn.Conv2d | nn.Conv3d | nn.Linear) or not called_once:
        return None  # a layer called twice would share more than the stem
    return node.target, module
