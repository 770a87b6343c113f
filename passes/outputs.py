"""Passes that rewrite a graph's output: keep the main logits, expose taps as outputs.

Distillation hooks are graph outputs rather than forward hooks: hooks on composite modules stop
firing once FX has inlined them, while an output is part of the graph itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from cmtkd_graph.passes.taps import Tap
from cmtkd_graph.passes.tracer import copy_graph_module, nodes_by_qualname
from torch import fx

LOGITS = "logits"
FEATURES = "features"


def keep_main_output(gm: fx.GraphModule) -> fx.GraphModule:
    """Make the graph return only the main logits tensor.

    GoogLeNet / Inception v3 traced in training mode return ``(logits, aux...)``; the auxiliary heads
    are not part of CMT-KD, so they are removed with their modules (a torchvision checkpoint then
    reports their keys as unexpected, never a torchvision key as missing).
    """
    gm = copy_graph_module(gm)
    out = _output_node(gm)
    value = out.args[0]
    if isinstance(value, fx.Node):
        return gm
    if isinstance(value, tuple | list) and value and isinstance(value[0], fx.Node):
        out.args = (value[0],)
    elif isinstance(value, dict) and isinstance(value.get(LOGITS), fx.Node):
        out.args = (value[LOGITS],)
    else:
        raise ValueError(f"cannot find the logits among the model outputs {value!r}")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def expose_taps(gm: fx.GraphModule, taps: Sequence[Tap]) -> fx.GraphModule:
    """Return ``{"logits": logits, "features": {tap.name: feature}}`` instead of the logits alone.

    Channels-last taps (Swin stages, NHWC) are permuted to NCHW so every loss sees [B, C, H, W].
    """
    gm = copy_graph_module(gm)
    by_name = nodes_by_qualname(gm)
    out = _output_node(gm)
    logits = out.args[0]
    features = {}
    for tap in taps:
        node = by_name[tap.node]
        if tap.channels_last:
            with gm.graph.inserting_before(out):
                node = gm.graph.call_function(torch.permute, (node, (0, 3, 1, 2)))
            node.meta["qualname"] = f"{tap.node}.to_nchw"
        features[tap.name] = node
    out.args = ({LOGITS: logits, FEATURES: features},)
    gm.graph.lint()
    gm.recompile()
    return gm
