"""The side-by-side pass: K teachers in one GraphModule that run independently (no fusion).

For methods whose teachers do not exchange features (average teacher, AMTML-KD, CTKD): teacher k's
nodes and modules keep their names under ``teacher{k}.`` as in the composition pass, so checkpoints,
freezing and inspection treat both arrangements alike. The output is

    {"each_logits": (z_1..z_K), "features": {key: F}}

where ``features`` holds the taps each teacher was asked to expose (``exposed[k]`` maps an output
key, usually the student tap it teaches, to a tap of teacher k), plus ``"each_aux"`` where a teacher
kept an auxiliary head (as in the composition pass).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cmtkd_graph.passes.common import (
    EACH_AUX,
    EACH_LOGITS,
    FEATURES,
    META,
    copy_teacher_node,
    find_node,
    network_outputs,
    to_nchw,
)
from cmtkd_graph.passes.taps import Tap
from torch import fx, nn

from cmtkd_graph.errors import UserError


def stack_teachers(
    teachers: Sequence[fx.GraphModule], exposed: Sequence[Mapping[str, Tap]] = ()
) -> fx.GraphModule:
    """One graph running every teacher on the shared input (see module docstring).

    ``teachers[k]`` returns its logits (``keep_main_output``); ``exposed[k]`` maps output keys to taps of
    teacher k (default: nothing exposed). Channels-last taps (Swin's NHWC stages) are exposed permuted
    to NCHW, as every loss expects.
    """
    if not teachers:
        raise UserError("teachers: at least one teacher is needed")
    exposed = list(exposed) or [{} for _ in teachers]
    if len(exposed) != len(teachers):
        raise ValueError("one mapping of exposed nodes per teacher is required")
    root = nn.Module()
    for k, t in enumerate(teachers):
        root.add_module(f"teacher{k}", t)
    graph = fx.Graph()
    image = graph.placeholder("x")
    image.meta = {"qualname": "x", META: {"role": "input"}}
    each_logits, each_aux = [], []
    features: dict[str, fx.Node] = {}
    for k, teacher in enumerate(teachers):
        env: dict[fx.Node, fx.Node] = {}
        for node in teacher.graph.nodes:
            if node.op == "placeholder":
                env[node] = image
            elif node.op == "output":
                main, aux = network_outputs(node.args[0])
                each_logits.append(env[main])
                each_aux.append(None if aux is None else env[aux])
            else:
                env[node] = copy_teacher_node(graph, node, env, k)
        for key, tap in exposed[k].items():
            if key in features:
                raise ValueError(f"output key {key!r} is exposed by two teachers")
            node = env[find_node(teacher, tap.node)]
            features[key] = to_nchw(graph, node) if tap.channels_last else node
    value = {EACH_LOGITS: tuple(each_logits), FEATURES: features}
    if any(a is not None for a in each_aux):
        value[EACH_AUX] = tuple(each_aux)
    out = graph.output(value)
    out.meta = {"qualname": "output", META: {"role": "output"}}
    graph.lint()
    gm = fx.GraphModule(root, graph, "StackedTeachers")
    gm.train(teachers[0].training)
    return gm
