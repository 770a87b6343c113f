"""Activation checkpointing of the teachers, segment by segment (``train.activation_checkpointing``).

K teachers hold K times the student's activations for the backward pass. This pass groups the nodes of
each teacher between two taps (``node.meta["cmtkd"]["teacher"]`` and ``["segment"]``, written by the
composition pass; a side-by-side teacher is one segment) into one call that runs under
``torch.utils.checkpoint`` (non-reentrant): only a segment's inputs are kept (the image or the shared
knowledge of the previous tap) and its inner activations are recomputed during backward.

* Parameter and buffer names do not change: the segments call the very modules the graph owns and are
  not registered as modules themselves, so checkpoints load either way.
* Recomputation leaves no trace: a segment's buffers (BatchNorm running statistics and batch counts)
  are saved before it recomputes and restored after, so they move once per step as without
  checkpointing; the RNG (dropout) is replayed by ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.graph_pass import graph_pass
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE = "recompute"
"""Name of the (parameter-free) module holding the segment callers."""


class CheckpointedSegment(nn.Module):
    """Runs one segment graph under ``torch.utils.checkpoint``; owns no parameters or buffers."""

    def __init__(self, segment: fx.GraphModule, label: str):
        super().__init__()
        object.__setattr__(self, "segment", segment)  # not a child: its modules belong to the graph
        self.label = label

    def forward(self, *inputs: torch.Tensor):
        if not torch.is_grad_enabled():
            return self.segment(*inputs)
        if torch.compiler.is_compiling():
            # The compiled graph applies buffer updates once, outside the recomputed part (and
            # torch.compile accepts no context_fn here).
            return checkpoint(self.segment, *inputs, use_reentrant=False)
        return checkpoint(self.segment, *inputs, use_reentrant=False, context_fn=self._contexts)

    def _contexts(self):
        return contextlib.nullcontext(), self._restoring_buffers()

    @contextlib.contextmanager
    def _restoring_buffers(self) -> Iterator[None]:
        modules = [m for m in self.segment.modules() if m is not self.segment]
        buffers = [b for m in modules for b in m.buffers(recurse=False)]
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)

    def extra_repr(self) -> str:
        return f"{self.label}: {sum(1 for n in self.segment.graph.nodes if n.op != 'placeholder') - 1} nodes"


@graph_pass
def checkpoint_segments(gm: fx.GraphModule) -> None:
    """Replace every (teacher, segment) group of nodes by one checkpointed call (see module docstring)."""
    groups: dict[tuple[int, int], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get(META, {})
        if "teacher" in meta and node.op not in ("placeholder", "output"):
            groups.setdefault((meta["teacher"], meta.get("segment", 0)), []).append(node)
    if not groups:
        return
    holder = nn.Module()
    gm.add_module(RECOMPUTE, holder)
    for (k, level), nodes in groups.items():
        _replace_group(gm, holder, nodes, f"teacher{k}_segment{level}")


def _replace_group(gm: fx.GraphModule, holder: nn.Module, nodes: list[fx.Node], label: str) -> None:
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in members and used not in inputs:
                inputs.append(used)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]

    graph = fx.Graph()
    env = {node: graph.placeholder(node.name) for node in inputs}
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in outputs))
    segment = fx.GraphModule(gm, graph, label)  # the same module objects, under the same paths
    holder.add_module(label, CheckpointedSegment(segment, label))

    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(f"{RECOMPUTE}.{label}", tuple(inputs))
    call.meta = {"qualname": f"{RECOMPUTE}.{label}", META: {"role": "recompute", "segment": label}}
    results = {}
    with gm.graph.inserting_after(call):
        for i, node in enumerate(outputs):
            results[node] = gm.graph.call_function(operator.getitem, (call, i))
            results[node].meta = {**node.meta, "qualname": node.meta.get("qualname", node.name)}
    for node in outputs:
        node.replace_all_uses_with(results[node], delete_user_cb=lambda user: user not in members)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


__all__ = ["RECOMPUTE", "CheckpointedSegment", "checkpoint_segments"]
