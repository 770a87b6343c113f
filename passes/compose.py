"""The composition pass: K quantized teachers become one GraphModule with fusion nodes
(docs/methods.md#shared-knowledge-eq-1).

In the composed graph

* teacher k's nodes and modules are kept under the prefix ``teacher{k}.`` (parameters keep their
  names below it: ``teacher0.layer1.0.conv1.weight``);
* at every tap l a fusion node computes the shared knowledge F^l = sum_k softmax(a^l)_k F_k^l, and
  **every** later use of F_k^l in teacher k (main path, skip and downsample branches alike) consumes
  F^l instead, so the shared knowledge is the input of every teacher's next layers;
* the output is ``{"logits": z_T, "each_logits": (z_1..z_K), "shared": {tap: F^l}}`` where z_T is the
  combined-teacher logits (importance fusion at the output, or the plain mean); teachers that kept an
  auxiliary head (``keep_main_output``) add ``"each_aux"`` (None for a teacher without one). With
  ``combine=None`` the teachers' outputs are returned as they are, with no output fusion:
  ``{"each_logits": (out_1..out_K), "shared": ...}``, where ``out_k`` is whatever teacher k's graph
  returns (a detector backbone's feature maps by level, which its eager heads read).

Teachers are copied segment by segment in lockstep: all teachers up to tap 1, the fusion of tap 1,
all teachers up to tap 2, and so on, which keeps the node order topological.
"""

from __future__ import annotations

from collections.abc import Sequence

from cmtkd_graph.passes.common import (
    EACH_AUX,
    EACH_LOGITS,
    LOGITS,
    META,
    SHARED,
    copy_teacher_node,
    find_node,
    fusion_key,
    network_outputs,
    to_nchw,
)
from cmtkd_graph.passes.taps import Tap
from torch import fx, nn

from cmtkd_graph.errors import UserError
from cmtkd_graph.fusion import ImportanceFusion, output_fusion

OUTPUT_FUSION = "output"


def check_tap_shapes(taps_per_teacher: Sequence[Sequence[Tap]], teacher_names: Sequence[str]) -> None:
    """All teachers must have the same number of taps and the same shape at each tap."""
    counts = {len(t) for t in taps_per_teacher}
    if len(counts) != 1:
        raise UserError(
            "taps: teachers resolve to different numbers of taps: "
            + ", ".join(f"{n}: {len(t)}" for n, t in zip(teacher_names, taps_per_teacher, strict=True))
        )
    for level in zip(*taps_per_teacher, strict=True):
        shapes = {t.shape for t in level}
        if len(shapes) > 1:
            detail = ", ".join(
                f"{name} {t.node} {list(t.shape) if t.shape else '?'}"
                for name, t in zip(teacher_names, level, strict=True)
            )
            raise UserError(
                f"tap {level[0].name!r}: teachers disagree on the feature shape ({detail}); "
                "shared knowledge needs identical shapes — choose other taps or matching architectures"
            )


def compose_teachers(
    teachers: Sequence[fx.GraphModule],
    taps: Sequence[Sequence[Tap]],
    *,
    combine: str | None = "importance",
) -> fx.GraphModule:
    """Build the composed teacher graph (see module docstring).

    ``teachers[k]`` must return its logits tensor (see ``keep_main_output``), or anything with
    ``combine=None``; ``taps[k][l]`` is teacher k's node for tap l. ``combine`` is ``"importance"``,
    ``"mean"`` or None (no output fusion).
    """
    k_count = len(teachers)
    if k_count == 0:
        raise UserError("teachers: at least one teacher is needed to compose")
    if len(taps) != k_count:
        raise ValueError("one tap list per teacher is required")
    check_tap_shapes(taps, [f"teacher{k}" for k in range(k_count)])
    tap_names = [t.name for t in taps[0]] if taps and taps[0] else []

    device = next((p.device for p in teachers[0].parameters()), None)
    root = nn.Module()
    fusions = nn.Module()
    for k, t in enumerate(teachers):
        root.add_module(f"teacher{k}", t)
    root.add_module("fusion", fusions)

    graph = fx.Graph()
    image = graph.placeholder("x")
    image.meta = {"qualname": "x", META: {"role": "input"}}
    node_lists = [list(t.graph.nodes) for t in teachers]
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in teachers]
    cursors = [0] * k_count
    shared: dict[str, fx.Node] = {}

    def copy_until(k: int, stop: fx.Node | None, segment: int) -> tuple[fx.Node, fx.Node | None] | None:
        """Copy teacher k's nodes up to and including ``stop`` (None: to the end); return its logits and
        auxiliary logits at the end. The copies record ``segment``: how many taps precede them (for
        ``passes.recompute``)."""
        logits = None
        nodes = node_lists[k]
        while cursors[k] < len(nodes):
            node = nodes[cursors[k]]
            cursors[k] += 1
            if node.op == "placeholder":
                envs[k][node] = image
            elif node.op == "output" and combine is None:  # the teacher's outputs as they are
                logits = fx.map_arg(node.args[0], envs[k].__getitem__), None
            elif node.op == "output":
                main, aux = network_outputs(node.args[0])
                logits = envs[k][main], None if aux is None else envs[k][aux]
            else:
                envs[k][node] = copy_teacher_node(graph, node, envs[k], k)
                envs[k][node].meta[META]["segment"] = segment
            if node is stop:
                break
        return logits

    for level, name in enumerate(tap_names):
        tap_nodes = []
        for k in range(k_count):
            stop = find_node(teachers[k], taps[k][level].node)
            copy_until(k, stop, level)
            tap_nodes.append(stop)
        key = fusion_key(name)
        fusions.add_module(key, ImportanceFusion(k_count, name).to(device))
        fused = graph.call_module(f"fusion.{key}", tuple(envs[k][tap_nodes[k]] for k in range(k_count)))
        fused.meta = {
            "qualname": f"fusion.{key}",
            META: {"role": "fusion", "tap": name, "inputs": [f"teacher{k}" for k in range(k_count)]},
        }
        for k in range(k_count):
            envs[k][tap_nodes[k]] = fused  # every later use of F_k^l now reads the shared knowledge
        shared[name] = fused

    each_logits, each_aux = zip(*(copy_until(k, None, len(tap_names)) for k in range(k_count)), strict=True)

    def nchw(shared: dict[str, fx.Node]) -> dict[str, fx.Node]:
        """The losses see NCHW maps; the teachers go on with the fused map in their own layout."""
        return {
            name: to_nchw(graph, node) if taps[0][level].channels_last else node
            for level, (name, node) in enumerate(shared.items())
        }

    if combine is None:
        value = {EACH_LOGITS: tuple(each_logits), SHARED: nchw(shared)}
        return _finish(graph, root, value, teachers[0].training)
    fusions.add_module(OUTPUT_FUSION, output_fusion(k_count, combine, OUTPUT_FUSION).to(device))
    combined = graph.call_module(f"fusion.{OUTPUT_FUSION}", tuple(each_logits))
    combined.meta = {
        "qualname": f"fusion.{OUTPUT_FUSION}",
        META: {"role": "fusion", "tap": OUTPUT_FUSION, "combine": combine},
    }
    value = {LOGITS: combined, EACH_LOGITS: tuple(each_logits), SHARED: nchw(shared)}
    if any(a is not None for a in each_aux):
        value[EACH_AUX] = tuple(each_aux)
    return _finish(graph, root, value, teachers[0].training)


def _finish(graph: fx.Graph, root: nn.Module, value: dict, training: bool) -> fx.GraphModule:
    out = graph.output(value)
    out.meta = {"qualname": "output", META: {"role": "output"}}
    graph.lint()
    gm = fx.GraphModule(root, graph, "ComposedTeachers")
    gm.train(training)
    return gm
