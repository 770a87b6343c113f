"""What the passes built, as one ``networkx.DiGraph`` (for ``cmtkd-graph inspect``).

The graph is the FX graphs of the student and the composed teachers plus the pieces that live
outside them, so that structural facts can be checked by eye or by code:

* **ids** are readable and unique: ``input`` (the single shared image), ``student/layer1.0.conv1``,
  ``teacher0/layer1.0.conv1``, ``fusion/layer1``, ``adapter/layer1``, ``loss/layer1``,
  ``loss/logits``, ``student/output``, ``teachers/output``;
* **roles**: ``input``, ``student``, ``teacher`` (with ``teacher=k``), ``quantizer`` (``kind``
  activation or weight, ``bits``, ``signed``), ``tap`` (with ``tap`` and ``network``), ``fusion``
  (``tap``, ``combine``, and ``importance`` weights from ``--checkpoint``), ``adapter``, ``method`` (a
  module of the method, e.g. AMTML-KD's ``method/weighting``), ``output`` and ``loss``;
  every node of a network also says ``network`` (``student``, ``teacher0``...; the fusion nodes belong
  to ``teachers``, the composed graph);
* weight quantizers run inside their layer's forward, so they are no FX node: each is added as its own
  node (``<layer>.weight_quantizer``) with an edge of ``kind="weight"`` into every call of its layer;
* every node has ``op``, ``target``, ``module_type``, ``output_shape`` / ``dtype`` (shape propagation on
  ``(2, *input_shape)`` on the meta device), ``params`` (counted at a module's first call site only, so
  they add up to the network's total) and ``block`` (what ``view="blocks"`` collapses it into);
* distillation is drawn as edges of ``kind="distill"`` *into* loss nodes: the teacher feature a student
  tap learns from (CMT-KD's fusion node, or a side-by-side teacher's tap: AMTML-KD's teacher j mod K,
  CTKD's expert) and the student tap (through its FitNet adapter, if any) meet at ``loss/<tap>``; the
  method's logits target (``Method.logits_loss``) and the student logits meet at ``loss/logits``.
  Loss nodes have no successors, so the picture keeps the data flow's direction: nothing flows from
  the student into a teacher;
* a network rewritten part by part (``models.parts``: detectors, RAFT) is its parts' graphs, each with
  its own inputs and output (``student/rpn.head:x_1``, ``teacher0/rpn.head:output``; the part the
  teachers compose reads ``input``): the eager code between parts is no node. The fusions of the
  teachers' outputs (``fusion/output``, ``fusion/objectness``) take each teacher's part output
  (``system.output_parts``) and meet the student's at ``loss/output``. Shapes come from one run of the
  system on its device (:func:`meta_forward`), each part propagated on what it was called with.

Writers, rendering and the summary table are in :mod:`cmtkd_graph.inspection.output`, the command in
:mod:`cmtkd_graph.cli`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import torch
from torch import fx, nn

from cmtkd_graph.errors import UserError
from cmtkd_graph.fusion import Fusion, ImportanceFusion
from cmtkd_graph.passes.common import (
    EACH_LOGITS,
    EXTRAS,
    FEATURES,
    LOGITS,
    META,
    SHARED,
    fusion_key,
    output_value,
)
from cmtkd_graph.passes.compose import OUTPUT_FUSION
from cmtkd_graph.passes.graph_pass import network_graphs
from cmtkd_graph.passes.shapes import propagate_call_shapes, propagate_shapes
from cmtkd_graph.passes.tracer import QUALNAME_PREFIX, qualname
from cmtkd_graph.quantizers import FULL_PRECISION, Quantizer
from cmtkd_graph.system import DistillationSystem, SystemBase

Which = Literal["system", "teachers", "student"]
View = Literal["full", "blocks"]

INPUT = "input"
BLOCK_LIMIT = 40
"""A module scope with more nodes than this is split into its sub-scopes in the block view (ViT's
encoder, DenseNet's dense blocks); ResNet blocks have about a dozen."""

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CALLED_QUANTIZER = re.compile(r"input_quantizer(_\d+)?")  # one per call of a layer, each a graph node
_DECISIONS = (
    "kind",
    "bits",
    "signed",
    "quantizer",
    "weight_bits",
    "act_bits",
    "position",
    "roles",
    "rule",
    "rule_label",
    "reason",
    "tap",
)
"""Keys of ``node.meta["cmtkd"]`` copied onto the node (what the quantize/compose passes decided)."""


def system_graph(
    system: DistillationSystem,
    which: Which = "system",
    view: View = "full",
    importance: Mapping[str, Sequence[float]] | None = None,
) -> nx.DiGraph:
    """The graph of ``system``, see the module docstring (shapes are propagated again, on its nodes).

    ``which``: ``system`` (student + teachers + adapters + losses, one shared input), ``teachers`` or
    ``student``. ``importance``: fusion weights per tap name (see :func:`read_importance`).
    """
    if which not in ("system", "teachers", "student"):
        raise UserError(f"--which: expected system, teachers or student, got {which!r}")
    if view not in ("full", "blocks"):
        raise UserError(f"--view: expected full or blocks, got {view!r}")
    if which == "teachers" and system.teachers is None:
        raise UserError(
            f"--which teachers: spec {system.spec.name!r} (method {system.spec.method}) has no teachers"
        )
    input_shape = (2, *system.spec.data.input_shape())
    graph = nx.DiGraph(name=system.spec.name, which=which, view=view, input_shape=list(input_shape))
    taps = {info.label: {t.node: t.name for t in info.taps} for info in system.networks}
    family = system.spec.quantizer.name
    by_parts = not isinstance(system.student, fx.GraphModule)  # rewritten part by part (models.parts)
    if by_parts:  # shapes from one run of every layer, of a copy on the meta device (no state changes)
        on_meta = all(t.is_meta for t in itertools.chain(system.parameters(), system.buffers()))
        system = system if on_meta else copy.deepcopy(system).to("meta")
        modes = {module: module.training for module in system.modules()}
        try:
            propagate_call_shapes(system, functools.partial(meta_forward, system))
        finally:
            for module, training in modes.items():
                module.training = training
    scope = system.task.tap_part if by_parts else None  # the composed teachers' part
    if which in ("system", "student"):
        if by_parts:
            _add_parts(graph, system, system.student, "student", taps, family)
        else:
            propagate_shapes(system.student, input_shape)
            _add_fx_graph(graph, system.student, "student", taps, family)
    if which in ("system", "teachers") and system.teachers is not None:
        if not by_parts:
            propagate_shapes(system.teachers, input_shape)
        _add_fx_graph(graph, system.teachers, "teachers", taps, family, scope=scope)
        if by_parts:
            for k in range(system.num_teachers):
                holder = system.teachers.get_submodule(f"teacher{k}")
                _add_parts(graph, system, holder, f"teacher{k}", taps, family)
            _add_output_fusions(graph, system)
        _add_importance(graph, importance or {})
    if which == "system" and system.teachers is not None:
        _add_distillation(graph, system)
    return block_view(graph) if view == "blocks" else graph


def _add_fx_graph(
    graph: nx.DiGraph,
    gm: fx.GraphModule,
    label: str,
    taps: Mapping[str, Mapping[str, str]],
    family: str,
    part: Part | None = None,
    scope: str | None = None,
) -> None:
    """Add one GraphModule's nodes and data edges (``label``: ``student`` or ``teachers``; for one part of
    a network rewritten part by part, that network's label, ``teacher{k}`` for a teacher's). ``scope``:
    the path in the network of what ``gm``'s modules hold (a part's, ``rpn.head``; the composed teachers'
    part, ``backbone``), which module paths and blocks start with."""
    ids: dict[fx.Node, str] = {}
    counted: set[str] = set()  # module targets whose parameters are already on a node
    scope_sizes = _scope_sizes(gm)
    scope = scope or gm.meta.get(QUALNAME_PREFIX)
    for node in gm.graph.nodes:
        info = node.meta.get(META, {})
        network = _network(node, info, label) if part is None else _part_network(node, label, part)
        node_id = _node_id(node, label) if part is None else _part_node_id(node, label, part)
        ids[node] = node_id
        local = qualname(node).removeprefix(f"{network}.") if network else qualname(node)
        attrs = {"label": local, "role": _role(node, info, network), **_node_attrs(gm, node, counted)}
        if network is not None:
            attrs["network"] = network
        if "teacher" in info:
            attrs["teacher"] = info["teacher"]
        elif network is not None and network.startswith("teacher") and network[7:].isdigit():
            attrs["teacher"] = int(network[7:])
        if part is not None and node.op in ("placeholder", "output") and node_id != INPUT:
            end = node.name if node.op == "placeholder" else "output"
            attrs["label"], attrs["part"] = f"{part.path}:{end}", part.path
        tap = taps.get(network or "", {}).get(local)
        if tap is not None and attrs["role"] in ("student", "teacher"):
            attrs["role"], attrs["tap"] = "tap", tap
        attrs["block"] = _block_id(node, node_id, network, scope_sizes, scope)
        graph.add_node(node_id, **attrs)
        for source in dict.fromkeys(node.all_input_nodes):
            graph.add_edge(ids[source], node_id, kind="data")
        if node.op == "call_module":
            _add_weight_quantizer(graph, gm, node, node_id, attrs, family, scope)


@dataclass(frozen=True)
class Part:
    """One graph of a network rewritten part by part: its path in the network (``backbone``,
    ``rpn.head``) and whether its input is the system's shared input (the part the teachers compose)."""

    path: str
    shared_input: bool


def _add_parts(
    graph: nx.DiGraph,
    system: SystemBase,
    network: nn.Module,
    label: str,
    taps: Mapping[str, Mapping[str, str]],
    family: str,
) -> None:
    """Every graph of ``network`` (a detector's backbone and heads, RAFT's encoders and update block), each
    as its own subgraph: torchvision's eager code between them (anchors, box coding, NMS, RoIAlign; RAFT's
    correlation lookup and update loop) is no node."""
    for prefix, gm in network_graphs(network):
        path = prefix.removesuffix(".")
        _add_fx_graph(graph, gm, label, taps, family, Part(path, path == system.task.tap_part))


def _part_network(node: fx.Node, label: str, part: Part) -> str | None:
    return None if node.op == "placeholder" and part.shared_input else label


def _part_node_id(node: fx.Node, label: str, part: Part) -> str:
    """``student/rpn.head.conv.0.0``; a part's own inputs and output ``student/rpn.head:x_1``,
    ``teacher0/rpn.head:output``; the shared input ``input``."""
    if node.op == "placeholder":
        return INPUT if part.shared_input else f"{label}/{part.path}:{node.name}"
    if node.op == "output":
        return f"{label}/{part.path}:output"
    return f"{label}/{qualname(node)}"


def _add_output_fusions(graph: nx.DiGraph, system: SystemBase) -> None:
    """The fusions of the teachers' outputs in a system rewritten part by part (``teachers.fusion.<name>``,
    run by eager code on each teacher's part output ``system.output_parts[name]``), as fusion nodes."""
    holder = system.teachers.get_submodule("fusion")
    for name, path in system.output_parts.items():
        if not hasattr(holder, name):
            continue  # without mutual learning no output is fused
        module = holder.get_submodule(name)
        fusion_id = f"fusion/{name}"
        combine = "importance" if isinstance(module, ImportanceFusion) else "mean"
        _add_module_node(
            graph, fusion_id, f"fusion.{name}", module, "fusion", "teachers", tap=name, combine=combine
        )
        for k in range(system.num_teachers):
            graph.add_edge(f"teacher{k}/{path}:output", fusion_id, kind="data")


def _network(node: fx.Node, info: Mapping[str, Any], label: str) -> str | None:
    """``student``, ``teacher{k}``, ``teachers`` (fusion nodes, the composed output) or None (input)."""
    if node.op == "placeholder":
        return None
    if label == "student":
        return "student"
    return f"teacher{info['teacher']}" if "teacher" in info else "teachers"


def _node_id(node: fx.Node, label: str) -> str:
    if node.op == "placeholder":
        return INPUT
    if node.op == "output":
        return f"{label}/output"
    name = qualname(node)
    if label == "student":
        return f"student/{name}"
    network, _, rest = name.partition(".")  # teacher0.layer1.0.conv1, fusion.layer1
    return f"{network}/{rest}"


def _role(node: fx.Node, info: Mapping[str, Any], network: str | None) -> str:
    if node.op in ("placeholder", "output"):
        return "input" if node.op == "placeholder" else "output"
    if info.get("role") in ("quantizer", "fusion"):
        return info["role"]
    return "student" if network == "student" else "teacher"


def _node_attrs(gm: fx.GraphModule, node: fx.Node, counted: set[str]) -> dict[str, Any]:
    """The attributes every node has (op, target, type, shape, parameters) plus the passes' decisions."""
    attrs: dict[str, Any] = {"op": node.op, "target": _target_name(node.target)}
    params = 0
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        attrs["module_type"] = type(module).__name__
        prefix = gm.meta.get(QUALNAME_PREFIX)  # a part's modules: their path in the network
        attrs["module"] = f"{prefix}.{node.target}" if prefix else node.target
        if node.target not in counted:
            counted.add(node.target)
            params = sum(
                p.numel() for n, p in module.named_parameters() if not n.startswith("weight_quantizer.")
            )
        if isinstance(module, Fusion):
            attrs["combine"] = "importance" if isinstance(module, ImportanceFusion) else "mean"
    elif node.op == "get_attr" and node.target not in counted:
        counted.add(node.target)
        value = _get_attr(gm, node.target)
        params = value.numel() if isinstance(value, nn.Parameter) else 0
    attrs["params"] = params
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and node.op != "output":  # an output's value may be stale (a dict now)
        attrs["output_shape"] = list(val.shape)
        attrs["dtype"] = str(val.dtype).removeprefix("torch.")
    info = node.meta.get(META, {})
    for key in _DECISIONS:
        if key in info:
            attrs[key] = info[key]
    return attrs


def bits_label(weight_bits: int, act_bits: int) -> str:
    """``W2A2``, ``WfpAfp`` (as in the spec's bits labels)."""
    return "W{}A{}".format(*("fp" if b == FULL_PRECISION else b for b in (weight_bits, act_bits)))


def precision_label(weight_bits: int, act_bits: int) -> str:
    """``W8A8``, or ``full precision`` for a float layer."""
    full = weight_bits == act_bits == FULL_PRECISION
    return "full precision" if full else bits_label(weight_bits, act_bits)


def _target_name(target: Any) -> str:
    """``layer1.0.conv1``, ``operator.add``, ``torch.flatten``, ``view``: what a node runs, readably."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", type(target).__name__)
    module = {"_operator": "operator", "builtins": ""}.get(module, module)
    return f"{module}.{name}" if module else name


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _add_weight_quantizer(
    graph: nx.DiGraph,
    gm: fx.GraphModule,
    node: fx.Node,
    node_id: str,
    attrs: dict[str, Any],
    family: str,
    scope: str | None = None,
) -> None:
    """The quantizers inside a quantized layer (its weight quantizers; for attention modules also the
    output projection's input quantizer), each as its own node with an edge into the layer."""
    layer = gm.get_submodule(node.target)
    network = attrs.get("network")
    module_path = node.target.removeprefix(f"{network}.") if network else node.target
    if scope:  # a part's layer (which may run once per feature level), or the composed teachers'
        module_path = f"{scope}.{module_path}"
    prefix = node_id.partition("/")[0]
    for name, quantizer in layer.named_modules():
        if not name or _CALLED_QUANTIZER.fullmatch(name) or not isinstance(quantizer, Quantizer):
            continue  # the input quantizers of its calls are nodes
        quant_id = f"{prefix}/{module_path}.{name}"
        if quant_id not in graph:
            extra = {"network": network, "teacher": attrs.get("teacher")}
            graph.add_node(
                quant_id,
                label=f"{module_path}.{name}",
                op="call_module",
                target=f"{node.target}.{name}",
                module_type=type(quantizer).__name__,
                role="quantizer",
                kind="weight" if name.endswith("weight_quantizer") else "activation",
                bits=quantizer.bits,
                signed=quantizer.signed,
                quantizer=family,
                consumer=attrs["label"],
                params=sum(p.numel() for p in quantizer.parameters()),
                block=attrs["block"],
                **{k: v for k, v in extra.items() if v is not None},
            )
        graph.add_edge(quant_id, node_id, kind="weight" if name.endswith("weight_quantizer") else "internal")


def _scope_sizes(gm: fx.GraphModule) -> Counter[str]:
    """How many nodes each module scope holds (for the block view's choice of granularity)."""
    sizes: Counter[str] = Counter()
    for node in gm.graph.nodes:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            sizes[path] += 1
    return sizes


def _block_id(
    node: fx.Node, node_id: str, network: str | None, scope_sizes: Counter[str], prefix: str | None = None
) -> str:
    """The outermost module scope of ``node`` that is not a plain container and holds at most
    ``BLOCK_LIMIT`` nodes (``layer1.0`` in a ResNet); the node itself when it is in no scope. ``prefix``:
    the path of a part (``rpn.head``), whose scopes are its own."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack or network is None:
        return node_id
    chosen = stack[-1][0]
    for path, module_type in stack:
        if module_type not in _CONTAINERS and scope_sizes[path] <= BLOCK_LIMIT:
            chosen = path
            break
    if prefix:
        chosen = f"{prefix}.{chosen}"
    return f"{node_id.partition('/')[0]}/{chosen}"


def _add_importance(graph: nx.DiGraph, importance: Mapping[str, Sequence[float]]) -> None:
    for _, attrs in graph.nodes(data=True):
        if attrs["role"] == "fusion" and attrs["tap"] in importance:
            attrs["importance"] = [round(float(w), 6) for w in importance[attrs["tap"]]]


def _add_distillation(graph: nx.DiGraph, system: DistillationSystem) -> None:
    """Adapters, loss nodes, the method's modules and ``distill`` edges between student and teachers."""
    spec = system.spec
    by_parts = not isinstance(system.student, fx.GraphModule)
    tapped = system.student.get_submodule(system.task.tap_part) if by_parts else system.student
    student_out = output_value(tapped)
    teachers_out = output_value(system.teachers)
    hints = teachers_out.get(SHARED) or teachers_out.get(FEATURES) or {}
    feature_loss = spec.distill.feature_loss
    features = student_out.get(FEATURES, {}) if isinstance(student_out, dict) else {}
    for tap, feature in features.items():
        if tap not in hints:
            continue
        source = f"student/{qualname(feature)}"
        loss_id = f"loss/{tap}"
        graph.add_node(
            loss_id, **_loss_attrs(loss_id, f"{feature_loss} loss at {tap}", feature_loss), tap=tap
        )
        graph.add_edge(_node_id(hints[tap], "teachers"), loss_id, kind="distill")
        key = fusion_key(tap)
        if key in system.adapters:
            adapter_id = f"adapter/{key}"
            graph.add_node(adapter_id, **_adapter_attrs(system.adapters[key], key, tap, graph.nodes[source]))
            graph.add_edge(source, adapter_id, kind="distill")
            graph.add_edge(adapter_id, loss_id, kind="distill")
        else:
            graph.add_edge(source, loss_id, kind="distill")
    logits_loss = system.method.logits_loss()
    if logits_loss is None:
        return
    if by_parts:  # the losses on the fused outputs (the parts' outputs, through eager code)
        for name, path in system.output_parts.items():
            if f"fusion/{name}" in graph:
                loss_id = f"loss/{name}"
                loss = system.mutual_label or logits_loss.label
                graph.add_node(loss_id, **_loss_attrs(loss_id, f"{loss} on {name}", loss))
                graph.add_edge(f"student/{path}:output", loss_id, kind="distill")
                graph.add_edge(f"fusion/{name}", loss_id, kind="distill")
        return
    graph.add_node("loss/logits", **_loss_attrs("loss/logits", logits_loss.label, logits_loss.label))
    graph.add_edge(f"student/{qualname(student_out[LOGITS])}", "loss/logits", kind="distill")
    each = teachers_out[EACH_LOGITS]
    if logits_loss.teachers == "combined":
        sources = [f"fusion/{OUTPUT_FUSION}"]
    else:
        chosen = range(len(each)) if logits_loss.teachers == "each" else logits_loss.teachers
        sources = [_node_id(each[k], "teachers") for k in chosen]
    for source in sources:
        graph.add_edge(source, "loss/logits", kind="distill")
    if logits_loss.via is not None:
        module = system.method_modules[logits_loss.via]
        via_id = f"method/{logits_loss.via}"
        _add_module_node(graph, via_id, f"method_modules.{logits_loss.via}", module, "method", "method")
        if logits_loss.student_extra is not None:
            extra = student_out[EXTRAS][logits_loss.student_extra]
            graph.add_edge(f"student/{qualname(extra)}", via_id, kind="distill")
        graph.add_edge(via_id, "loss/logits", kind="distill")


def meta_forward(system: SystemBase) -> torch.Tensor:
    """Every layer of ``system`` run once on a batch of 2 on its device, summed to one number (for a
    backward): a detector's layers (``layers_forward``: its box logic needs values, which the meta device
    has not), else the system in eval mode (the graph is the one traced in training mode; on the meta
    device BatchNorm's training kernel runs as slow Python decompositions) and its loss on example
    labels."""
    device = next(itertools.chain(system.parameters(), system.buffers())).device
    x = torch.zeros(2, *system.spec.data.input_shape(), device=device)
    system.eval()
    if hasattr(system, "layers_forward"):
        return system.layers_forward(x)
    out = system(x)
    labels = system.task.example_labels(2, 10, system.spec.data.input_shape(), device, system.spec)
    return system.losses(out, labels)["total"]


def _add_module_node(
    graph: nx.DiGraph, node_id: str, target: str, module: nn.Module, role: str, network: str, **extra: Any
) -> None:
    """A module the system runs outside the FX graphs (a method's module, a fusion eager code calls)."""
    graph.add_node(
        node_id,
        label=target,
        op="call_module",
        target=target,
        module_type=type(module).__name__,
        role=role,
        network=network,
        **extra,
        params=sum(p.numel() for p in module.parameters()),
        block=node_id,
    )


def _loss_attrs(loss_id: str, label: str, loss: str) -> dict[str, Any]:
    return {"label": label, "op": "loss", "role": "loss", "loss": loss, "params": 0, "block": loss_id}


def _adapter_attrs(adapter: nn.Module, key: str, tap: str, student_tap: Mapping[str, Any]) -> dict[str, Any]:
    """A FitNet adapter's node: its type, parameters and output shape (run on the meta device)."""
    attrs: dict[str, Any] = {
        "label": f"adapters.{key}",
        "op": "call_module",
        "target": f"adapters.{key}",
        "module_type": type(adapter).__name__,
        "role": "adapter",
        "network": "adapters",
        "tap": tap,
        "params": sum(p.numel() for p in adapter.parameters()),
        "block": f"adapter/{key}",
    }
    if "output_shape" in student_tap:
        shadow = copy.deepcopy(adapter).to("meta").eval()
        out = shadow(torch.empty(student_tap["output_shape"], device="meta"))
        attrs["output_shape"] = list(out.shape)
        attrs["dtype"] = str(out.dtype).removeprefix("torch.")
    return attrs


def block_view(graph: nx.DiGraph) -> nx.DiGraph:
    """Collapse every node into its ``block`` (fusion, input, output, adapter and loss nodes stay).

    A block's attributes summarise its nodes: count, parameters, the output shape of its last node,
    the bits of its quantized layers and the taps inside it (its role is then ``tap``).
    """
    members: dict[str, list[str]] = defaultdict(list)
    for node_id, attrs in graph.nodes(data=True):
        members[attrs["block"]].append(node_id)
    blocks = nx.DiGraph(**{**graph.graph, "view": "blocks"})
    for block, nodes in members.items():
        blocks.add_node(block, **_block_attrs(graph, block, nodes))
    for u, v, attrs in graph.edges(data=True):
        bu, bv = graph.nodes[u]["block"], graph.nodes[v]["block"]
        if bu == bv:
            continue
        if blocks.has_edge(bu, bv) and blocks.edges[bu, bv]["kind"] == "data":
            continue
        blocks.add_edge(bu, bv, kind=attrs["kind"])
    return blocks


def _block_attrs(graph: nx.DiGraph, block: str, nodes: list[str]) -> dict[str, Any]:
    if len(nodes) == 1 and nodes[0] == block:
        return dict(graph.nodes[block])
    data = [graph.nodes[n] for n in nodes]
    first = data[0]
    attrs: dict[str, Any] = {
        "label": block.partition("/")[2],
        "op": "block",
        "role": "student" if first.get("network") == "student" else "teacher",
        "nodes": len(nodes),
        "params": sum(d.get("params", 0) for d in data),
    }
    for key in ("network", "teacher"):
        if key in first:
            attrs[key] = first[key]
    shaped = [d for d in data if "output_shape" in d and d["role"] != "quantizer"]
    if shaped:
        attrs["output_shape"], attrs["dtype"] = shaped[-1]["output_shape"], shaped[-1]["dtype"]
    bits = sorted({(d["weight_bits"], d["act_bits"]) for d in data if "weight_bits" in d})
    if bits:
        attrs["layer_bits"] = ", ".join(bits_label(w, a) for w, a in bits)
    taps = [d["tap"] for d in data if d["role"] == "tap"]
    if taps:
        attrs["role"], attrs["tap"] = "tap", ", ".join(taps)
    return attrs


def read_importance(run_dir: str | Path, system: DistillationSystem) -> dict[str, list[float]]:
    """The softmax importance weights per tap from the latest checkpoint of a training run.

    ``RUN_DIR/checkpoints/latest`` names the checkpoint; its ``model.safetensors`` (accelerate's
    ``save_state``) holds the system's state dict, with the logits at ``teachers.fusion.<key>.logits``.
    """
    from safetensors import safe_open

    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise UserError(
            f"--checkpoint: {run_dir} is not a run directory with a checkpoint ({pointer} is missing)"
        )
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--checkpoint: {pointer} does not name a checkpoint") from None
    weights = root / name / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"--checkpoint: {weights} is missing (checkpoint {name} incomplete or deleted)")
    if system.teachers is None:
        raise UserError(f"--checkpoint: spec {system.spec.name!r} has no teachers, so no importance weights")
    out: dict[str, list[float]] = {}
    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
        for key, module in system.teachers.get_submodule("fusion").named_children():
            if not isinstance(module, ImportanceFusion):
                continue
            state_key = f"teachers.fusion.{key}.logits"
            if state_key not in stored:
                raise UserError(
                    f"--checkpoint: {weights} has no {state_key}; was the run trained with this spec?"
                )
            logits = f.get_tensor(state_key).float()
            if logits.shape != (module.num_inputs,):
                raise UserError(
                    f"--checkpoint: {state_key} has shape {list(logits.shape)}, but the spec has "
                    f"{module.num_inputs} teachers"
                )
            out[module.tap] = torch.softmax(logits, dim=0).tolist()
    return out


__all__ = [
    "BLOCK_LIMIT",
    "INPUT",
    "bits_label",
    "block_view",
    "read_importance",
    "system_graph",
]
