"""Passes that rewrite a graph's output: keep the main logits, expose taps as outputs.

Distillation hooks are graph outputs rather than forward hooks: hooks on composite modules stop
firing once FX has inlined them, while an output is part of the graph itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cmtkd_graph.passes.common import AUX, EXTRAS, FEATURES, LOGITS, network_outputs, output_node, to_nchw
from cmtkd_graph.passes.graph_pass import graph_pass
from cmtkd_graph.passes.taps import Tap
from cmtkd_graph.passes.tracer import nodes_by_qualname
from torch import fx


@graph_pass
def keep_main_output(gm: fx.GraphModule, key: str = LOGITS, aux_key: str | None = None) -> None:
    """Make the graph return only the main logits tensor (``key`` of a dict output: ``out`` for
    torchvision's segmentation models, whose task says so).

    With ``aux_key`` (a task's auxiliary output, e.g. segmentation's ``aux``) and a model that returns
    it (built with ``aux_loss=True``), the graph returns ``{"logits": main, "aux": auxiliary}``: the
    auxiliary head trains with the task's loss and is dropped from the deployed student.

    GoogLeNet / Inception v3 traced in training mode return ``(logits, aux...)``; those auxiliary heads
    are not part of CMT-KD, so they are removed with their modules (a torchvision checkpoint then
    reports their keys as unexpected, never a torchvision key as missing).
    """
    out = output_node(gm)
    value = out.args[0]
    if aux_key is not None and isinstance(value, dict) and isinstance(value.get(aux_key), fx.Node):
        out.args = ({LOGITS: value[key], AUX: value[aux_key]},)
        return
    if _is_tuple_construction(value):  # FX records `return GoogLeNetOutputs(logits, ...)` as a call
        fields = getattr(value.target, "_fields", ())
        value = value.args[fields.index(LOGITS) if LOGITS in fields else 0]
    if isinstance(value, tuple | list) and value and isinstance(value[0], fx.Node):
        value = value[0]
    elif isinstance(value, dict) and isinstance(value.get(key), fx.Node):
        value = value[key]
    if not isinstance(value, fx.Node):
        raise ValueError(f"cannot find the logits among the model outputs {value!r}")
    if value is out.args[0]:
        return
    out.args = (value,)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _is_tuple_construction(value: object) -> bool:
    return (
        isinstance(value, fx.Node)
        and value.op == "call_function"
        and isinstance(value.target, type)
        and issubclass(value.target, tuple)
    )


@graph_pass
def expose_taps(gm: fx.GraphModule, taps: Sequence[Tap], extras: Mapping[str, str] | None = None) -> None:
    """Return ``{"logits": logits, "features": {tap.name: feature}}`` instead of the logits alone (and
    ``"aux"``: the auxiliary logits, where ``keep_main_output`` kept them).

    Channels-last taps (Swin stages, NHWC) are permuted to NCHW so every loss sees [B, C, H, W].
    ``extras`` (output key -> node name) adds ``"extras": {key: node}``: other nodes a method reads.
    """
    by_name = nodes_by_qualname(gm)
    out = output_node(gm)
    logits, aux = network_outputs(out.args[0])
    features = {}
    for tap in taps:
        node = by_name[tap.node]
        if tap.channels_last:
            with gm.graph.inserting_before(out):
                node = to_nchw(gm.graph, node)
        features[tap.name] = node
    value = {LOGITS: logits, FEATURES: features}
    if aux is not None:
        value[AUX] = aux
    if extras:
        value[EXTRAS] = {key: by_name[name] for key, name in extras.items()}
    out.args = (value,)
