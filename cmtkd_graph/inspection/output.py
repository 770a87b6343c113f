"""Writing an inspection graph (GraphML, node-link JSON, DOT, SVG/PNG) and the summary table.

The files are written by networkx's own writers; GraphML takes only scalar attributes, so lists
(shapes, importance weights) become JSON strings there. SVG and PNG are rendered by Graphviz ``dot``
from the DOT text; when ``dot`` is not installed the DOT file is written instead, with a UserError.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx

from cmtkd_graph.errors import UserError
from cmtkd_graph.inspection.graph import bits_label, precision_label, system_graph
from cmtkd_graph.quantizers import FULL_PRECISION
from cmtkd_graph.system import DistillationSystem

FORMATS = ("graphml", "json", "dot", "svg", "png")
_SUFFIXES = {
    ".graphml": "graphml",
    ".json": "json",
    ".dot": "dot",
    ".gv": "dot",
    ".svg": "svg",
    ".png": "png",
}

# Fill colours of the rendered picture, by network (teachers cycle through the last four).
_NETWORK_COLORS = {"student": "#cfe2ff", "teachers": "#ffd8a8", "adapters": "#d3f9d8"}
_TEACHER_COLORS = ("#e5dbff", "#fff3bf", "#c3fae8", "#ffdeeb")
_ROLE_SHAPES = {"fusion": "hexagon", "quantizer": "ellipse", "loss": "octagon", "input": "invhouse"}


def output_format(path: str | Path, fmt: str | None = None) -> str:
    """``fmt``, or the format named by the file suffix of ``path``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise UserError(
            f"--out {path}: cannot tell the format from the suffix {suffix or '(none)'}; "
            f"use one of {', '.join(_SUFFIXES)} or give --format"
        )
    return _SUFFIXES[suffix]


def write_graph(graph: nx.DiGraph, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``graph`` to ``path`` in ``fmt`` (default: from the suffix); return the path written."""
    path = Path(path)
    fmt = output_format(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "graphml":
        nx.write_graphml(scalar_graph(graph), path)
    elif fmt == "json":
        path.write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
    elif fmt == "dot":
        nx.nx_pydot.write_dot(dot_graph(graph), path)
    else:
        render(graph, path, fmt)
    return path


def graphviz_dot() -> str | None:
    """The Graphviz ``dot`` executable on PATH, or None."""
    return shutil.which("dot")


def render(graph: nx.DiGraph, path: Path, fmt: str) -> None:
    """SVG/PNG through Graphviz; without ``dot``, write ``path.dot`` and raise a UserError saying so."""
    dot = graphviz_dot()
    styled = dot_graph(graph)
    if dot is None:
        dot_path = path.with_suffix(".dot")
        nx.nx_pydot.write_dot(styled, dot_path)
        raise UserError(
            f"Graphviz `dot` is not installed, so no {fmt.upper()} was rendered; the graph was written to "
            f"{dot_path} (install Graphviz, e.g. `apt-get install graphviz`, then `dot -T{fmt} {dot_path}`)"
        )
    text = nx.nx_pydot.to_pydot(styled).to_string()
    done = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=text, text=True, capture_output=True)
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise UserError(f"Graphviz `dot` failed to render {path}: {detail}")


def scalar_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy whose attributes are all str/int/float/bool (GraphML): lists become JSON strings."""
    out = nx.DiGraph(**{k: _scalar(v) for k, v in graph.graph.items() if v is not None})
    for node, attrs in graph.nodes(data=True):
        out.add_node(node, **{k: _scalar(v) for k, v in attrs.items() if v is not None})
    for u, v, attrs in graph.edges(data=True):
        out.add_edge(u, v, **{k: _scalar(x) for k, x in attrs.items() if x is not None})
    return out


def _scalar(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else value


def dot_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy with Graphviz styling: multi-line labels, colours by network, shapes by role."""
    out = scalar_graph(graph)
    title = f"{graph.graph.get('name', '')}: {graph.graph.get('which')} ({graph.graph.get('view')} view)"
    out.graph = {
        "name": graph.graph.get("name", ""),
        "graph": {"rankdir": "TB", "label": title, "labelloc": "t", "fontname": "Helvetica"},
        "node": {"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"},
        "edge": {"color": "#555555", "arrowsize": "0.6"},
    }
    for node, attrs in out.nodes(data=True):
        source = graph.nodes[node]
        attrs["label"] = "\\n".join([node, *_label_lines(source)])
        attrs["fillcolor"] = _color(source)
        if source["role"] in _ROLE_SHAPES:
            attrs["shape"] = _ROLE_SHAPES[source["role"]]
        if source["role"] == "quantizer":
            attrs["fontsize"] = "8"
    for _, _, attrs in out.edges(data=True):
        if attrs.get("kind") == "weight":
            attrs["style"] = "dashed"
        elif attrs.get("kind") == "distill":
            attrs.update(color="#c92a2a", style="bold")
    return out


def _label_lines(attrs: Mapping[str, Any]) -> list[str]:
    """The lines under a node's id in the picture: type and bits, tap, importance, shape."""
    lines = [attrs["label"]] if attrs["role"] == "loss" else []
    kind = attrs.get("module_type", "")
    if attrs.get("op") in ("call_function", "call_method"):
        kind = attrs["target"]
    if attrs["role"] == "quantizer":
        kind = f"{attrs['kind']} {attrs['bits']}b {'signed' if attrs['signed'] else 'unsigned'}"
    elif "weight_bits" in attrs:
        kind = f"{kind} {bits_label(attrs['weight_bits'], attrs['act_bits'])}"
    elif "layer_bits" in attrs:
        kind = f"{kind} {attrs['layer_bits']}".strip()
    if kind:
        lines.append(kind)
    if "tap" in attrs and attrs["role"] in ("tap", "fusion"):
        lines.append(f"tap {attrs['tap']}")
    if "importance" in attrs:
        lines.append("importance " + " ".join(f"{w:.3f}" for w in attrs["importance"]))
    if "output_shape" in attrs:
        lines.append("x".join(str(d) for d in attrs["output_shape"]))
    return lines


def _color(attrs: Mapping[str, Any]) -> str:
    if attrs["role"] == "loss":
        return "#ffc9c9"
    if attrs["role"] == "quantizer":
        return "#e9ecef"
    if "teacher" in attrs:
        return _TEACHER_COLORS[attrs["teacher"] % len(_TEACHER_COLORS)]
    return _NETWORK_COLORS.get(attrs.get("network", ""), "#ffffff")


def summary_table(system: DistillationSystem, importance: Mapping[str, Sequence[float]] | None = None) -> str:
    """Per network: quantized layers by bit-width, full-precision layers and why, quantizers, taps with
    shapes and parameters; then the fusion nodes (with ``importance`` weights when given) and adapters."""
    graph = system_graph(system, "system", "full", importance)
    spec = system.spec
    shape = "x".join(str(d) for d in graph.graph["input_shape"])
    lines = [
        f"{spec.name}: method {spec.method}, quantizer {spec.quantizer.name}, input {shape}, "
        f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges"
    ]
    for info in system.networks:
        lines += _network_lines(graph, info.label, f"{info.spec.arch} {info.spec.bits_label}")
    lines += _fusion_lines(graph)
    lines += _adapter_lines(graph)
    losses = [a["label"] for _, a in graph.nodes(data=True) if a["role"] == "loss"]
    if losses:
        lines.append(f"distillation: {', '.join(losses)}")
    return "\n".join(lines)


def _network_lines(graph: nx.DiGraph, network: str, title: str) -> list[str]:
    nodes = [a for _, a in graph.nodes(data=True) if a.get("network") == network]
    # one entry per layer, however many times it is called (a detector's head runs once per FPN level)
    layers = _first_calls([a for a in nodes if "weight_bits" in a])
    quantized = Counter(
        (bits_label(a["weight_bits"], a["act_bits"]), a["module_type"])
        for a in layers
        if a["weight_bits"] != FULL_PRECISION
    )
    kept = [  # those a precision rule keeps are counted on its own row
        f"{a['label']} {a['module_type']} ({a['reason']})"
        for a in layers
        if a["weight_bits"] == FULL_PRECISION and not a.get("rule_label")
    ]
    quantizers = _first_calls([a for a in nodes if a["role"] == "quantizer"])
    acts = [a for a in quantizers if a["kind"] == "activation"]
    signed = sum(a["signed"] for a in acts)
    weights = Counter(a["bits"] for a in quantizers if a["kind"] == "weight")
    taps = [f"{a['tap']} = {a['label']} {a.get('output_shape', '?')}" for a in nodes if a["role"] == "tap"]
    rows = [
        ("quantized layers", ", ".join(f"{b}: {n} {t}" for (b, t), n in sorted(quantized.items()))),
        ("full precision", ", ".join(kept)),
        ("precision rules", rule_counts(layers)),
        ("input quantizers", f"{len(acts)} ({len(acts) - signed} unsigned, {signed} signed)"),
        ("weight quantizers", ", ".join(f"{n} x {b} bits" for b, n in sorted(weights.items()))),
        ("taps", ", ".join(taps)),
    ]
    params = sum(a["params"] for a in nodes)
    return [f"{network} ({title}): {params:,} parameters, {len(nodes)} nodes", *_aligned(rows)]


def _first_calls(nodes: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The node of each module's first call (a module called several times is one layer)."""
    first: dict[str, Mapping[str, Any]] = {}
    for attrs in nodes:
        first.setdefault(attrs.get("module", attrs["label"]), attrs)
    return list(first.values())


def rule_counts(layers: list[Mapping[str, Any]]) -> str:
    """``quantizer.rules[0] (role depthwise_conv): 11 layers W8A8``, one entry per rule that decided
    layers of a network (what decided the others, the first/last-layer rule and the network's bits, is
    in their bits and ``reason``); '' without rules."""
    decided = Counter(
        (
            a["rule"],
            precision_label(a["weight_bits"], a["act_bits"]),
            a["quantizer"] if a["weight_bits"] < 32 else "",
        )
        for a in layers
        if a.get("rule_label")
    )
    return "; ".join(
        f"{rule}: {n} layer{'s' if n > 1 else ''} at {bits}{f' ({family})' if family else ''}"
        for (rule, bits, family), n in sorted(decided.items())
    )


def _fusion_lines(graph: nx.DiGraph) -> list[str]:
    fusions = [(n, a) for n, a in graph.nodes(data=True) if a["role"] == "fusion"]
    if not fusions:
        return []
    params = sum(a["params"] for _, a in fusions)
    rows = []
    for node, attrs in fusions:
        weights = ""
        if "importance" in attrs:
            weights = "; importance " + ", ".join(f"{w:.3f}" for w in attrs["importance"])
        elif attrs["combine"] == "mean":
            weights = "; plain mean"
        sources = ", ".join(graph.predecessors(node))
        rows.append((attrs["tap"], f"{attrs.get('output_shape', '?')} <- {sources}{weights}"))
    learned = any("importance" in a for _, a in fusions)
    hint = "" if learned else " (importance weights of a run: --checkpoint RUN_DIR)"
    count = f"{len(fusions)} node{'s' if len(fusions) > 1 else ''}"
    return [f"fusion: {count}, {params:,} parameters{hint}", *_aligned(rows)]


def _adapter_lines(graph: nx.DiGraph) -> list[str]:
    adapters = [a for _, a in graph.nodes(data=True) if a["role"] == "adapter"]
    if not adapters:
        return []
    params = sum(a["params"] for a in adapters)
    rows = [(a["tap"], f"{a['module_type']} -> {a.get('output_shape', '?')}") for a in adapters]
    return [f"adapters: {len(adapters)}, {params:,} parameters", *_aligned(rows)]


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    rows = [(k, v) for k, v in rows if v]
    width = max((len(k) for k, _ in rows), default=0)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


__all__ = [
    "FORMATS",
    "dot_graph",
    "graphviz_dot",
    "output_format",
    "render",
    "scalar_graph",
    "summary_table",
    "write_graph",
]
