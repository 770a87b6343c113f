"""Output shapes of every node without computing anything (meta tensors), for tap checks and inspection."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial

import torch
from cmtkd_graph.passes.graph_pass import graph_modules
from cmtkd_graph.passes.tracer import copy_graph_module, qualname
from torch import fx

from cmtkd_graph.errors import UserError, first_line


def propagate_shapes(gm: fx.GraphModule, input_shape: Sequence[int]) -> dict[fx.Node, torch.Size]:
    """Run ``gm`` on a meta-device input of ``input_shape`` and return each tensor node's output shape.

    Runs in eval mode on meta tensors: nothing is computed or allocated and no state of ``gm`` changes
    (BatchNorm statistics, LSQ initialisation). A ``gm`` with real weights runs as a structural copy
    whose weights are meta tensors; one already on the meta device runs itself (copying a large graph
    costs more than running it there), its modules' train/eval flags restored afterwards.
    Also stores ``node.meta["val"]`` (a meta tensor: shape and dtype) on ``gm``'s nodes.
    """
    on_meta = all(t.is_meta for t in itertools.chain(gm.parameters(), gm.buffers()))
    shadow = gm if on_meta else copy_graph_module(gm, tensors="meta")
    modes = {module: module.training for module in shadow.modules()}
    shadow.eval()
    interpreter = _Recorder(shadow)
    try:
        interpreter.run(torch.empty(tuple(input_shape), device="meta"))
    except Exception as err:
        channels = _channel_mismatch(shadow, interpreter)
        if channels is not None:
            raise UserError(channels) from None
        where = f" at node {qualname(interpreter.current)}" if interpreter.current is not None else ""
        raise UserError(
            f"the model does not run on inputs of shape {list(input_shape)}{where}: {first_line(err)} "
            "(check data.image_size and the model's minimum input size)"
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training
    shapes = {}
    for node, twin in zip(gm.graph.nodes, shadow.graph.nodes, strict=True):
        value = interpreter.values.get(twin)
        if isinstance(value, torch.Tensor):
            node.meta["val"] = value
            shapes[node] = value.shape
        else:
            node.meta.pop("val", None)  # e.g. an output that became a dict since an earlier propagation
    return shapes


def propagate_call_shapes(module: torch.nn.Module, run: Callable[[], object]) -> dict[fx.GraphModule, int]:
    """Output shapes for a network of several graphs that eager code calls (``models.parts``: a detector's
    backbone and heads, RAFT's encoders and update block): ``run()`` runs it once (on the meta device, or
    on an example); each graph of ``module`` is then interpreted again on the arguments of its first call,
    which stores ``node.meta["val"]`` on its nodes as :func:`propagate_shapes` does. Returns how many
    times ``run`` called each graph (RAFT's update block: once per update); graphs it never calls keep no
    shapes."""
    calls: dict[fx.GraphModule, tuple] = {}
    counts: dict[fx.GraphModule, int] = {}

    def record(gm: fx.GraphModule, _module, args: tuple, kwargs: dict) -> None:
        counts[gm] = counts.get(gm, 0) + 1
        if gm not in calls:
            names = [n.target for n in gm.graph.nodes if n.op == "placeholder"][len(args) :]
            calls[gm] = (*args, *(kwargs[name] for name in names if name in kwargs))

    hooks = [
        gm.register_forward_pre_hook(partial(record, gm), with_kwargs=True) for gm in graph_modules(module)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    for gm, args in calls.items():
        interpreter = _Recorder(gm)
        with torch.no_grad():
            interpreter.run(*args)
        for node in gm.graph.nodes:
            value = interpreter.values.get(node)
            if isinstance(value, torch.Tensor) and node.op != "output":
                node.meta["val"] = torch.empty_like(value, device="meta")  # the shape, not the values
            else:
                node.meta.pop("val", None)
    return counts


def copy_shapes(source: fx.GraphModule, target: fx.GraphModule) -> bool:
    """Give ``target`` the propagated shapes of ``source`` when their graphs have the same nodes.

    For networks built from the same architecture, builder arguments and surgery (teachers that differ
    only in bit-widths): same nodes means same shapes, without running anything. Returns False (and
    copies nothing) when the node lists differ.
    """
    pairs = list(zip(source.graph.nodes, target.graph.nodes, strict=False))
    propagated = any(isinstance(a.meta.get("val"), torch.Tensor) for a, _ in pairs)
    same = (
        propagated
        and len(source.graph.nodes) == len(target.graph.nodes)
        and all(
            qualname(a) == qualname(b) and a.op == b.op and str(a.target) == str(b.target) for a, b in pairs
        )
    )
    if same:
        for a, b in pairs:
            if isinstance(a.meta.get("val"), torch.Tensor):
                b.meta["val"] = a.meta["val"]
    return same


class _Recorder(fx.Interpreter):
    """Interpreter that keeps every node's value and knows which node is running."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        result = super().run_node(n)
        self.values[n] = result
        return result


def _channel_mismatch(gm: fx.GraphModule, interpreter: _Recorder) -> str | None:
    """A clear message when a conv failed because its input has the wrong number of channels."""
    node = interpreter.current
    if node is None or node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    module = gm.get_submodule(str(node.target))
    value = interpreter.values.get(node.args[0])
    if not isinstance(module, torch.nn.modules.conv._ConvNd) or not isinstance(value, torch.Tensor):
        return None
    if value.dim() < 2 or value.shape[1] == module.in_channels:
        return None
    return (
        f"node {qualname(node)} expects {module.in_channels} input channels but gets {value.shape[1]} "
        f"(input shape {list(value.shape)}); for grey images either repeat them to RGB "
        "(data.grey_to_rgb: repeat) or give the model a 1-channel stem (data.grey_to_rgb: none together "
        "with surgery: [grey_input])"
    )


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated output shape of ``node`` (after :func:`propagate_shapes`), or None."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
