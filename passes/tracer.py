"""Tracing any torchvision model into a GraphModule whose nodes carry torchvision-style names.

Every node gets ``node.meta["qualname"]`` following ``torchvision.models.feature_extraction``:
module calls are named by their module path (``layer1.0.conv1``; a second call of the same module is
``layer1.0.relu_1``), functions by the module they run in plus the function name (``layer1.0.add``,
``flatten``). Those are the names users write in specs (taps) and see in inspection dumps.

Unlike ``create_feature_extractor`` we never stop at torchvision's composite blocks
(``Conv2dNormActivation``, ``BasicBlock``...): only ``torch.nn`` leaf layers, our quantizers and
fusion modules, torchvision's mode-dependent ``StochasticDepth``, conv/linear subclasses that compute
as their ``torch.nn`` base (the video ResNets' ``Conv3DSimple``) and the attention modules whose
projections run functionally (``nn.MultiheadAttention``, Swin's ``ShiftedWindowAttention(V2)``, and
their quantized twins) are leaves, so every real conv/linear/attention is a node of its own.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import torch
from torch import fx, nn

QUALNAME = "qualname"
"""``node.meta`` key of a node's torchvision-style name."""
QUALNAME_PREFIX = "cmtkd_qualname_prefix"
"""``gm.meta`` key of the path of a graph inside its model (a traced part of a detector: ``backbone``): the
names of its nodes start with it, as the model's state dict does (``cmtkd_graph.models.parts``)."""

_FX_SUFFIX = re.compile(r"_\d+$")
PRESERVED_ATTRIBUTES = "_user_preserved_attributes"
"""``gm.meta`` key of attributes FX's own deepcopy sets again on the copy (``torch.fx.graph_module``);
:func:`copy_graph_module` does too (a traced part's eager interface: ``cmtkd_graph.models.parts``)."""


def _extra_leaf_types() -> tuple[type, ...]:
    """Module types that must stay leaves although they are not in ``torch.nn``."""
    from torchvision.ops import StochasticDepth

    from cmtkd_graph.fusion import Fusion
    from cmtkd_graph.quantizers import Quantizer
    from cmtkd_graph.quantizers.attention import ATTENTION_TYPES
    from cmtkd_graph.quantizers.layers import QuantConv2d, QuantConv3d, QuantLinear

    # StochasticDepth decides train/eval behaviour with a Python `if`, which tracing would freeze.
    # Attention modules are swapped whole by the quantization pass (their subclasses are the twins).
    return (Quantizer, QuantConv2d, QuantConv3d, QuantLinear, Fusion, StochasticDepth, *ATTENTION_TYPES)


class GraphTracer(fx.Tracer):
    """FX tracer that goes through composite blocks and keeps mode-dependent layers as leaves."""

    def __init__(self) -> None:
        super().__init__()
        self._leaf_types = _extra_leaf_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or _plain_layer_subclass(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_LAYER_TYPES = (nn.Conv2d, nn.Conv3d, nn.Linear)


def _plain_layer_subclass(m: nn.Module) -> bool:
    """A conv/linear layer defined outside ``torch.nn`` that computes as its ``torch.nn`` base does
    (video ResNets' ``Conv3DSimple``, ``Conv3DNoTemporal``): a layer, not a block to trace through."""
    base = next((t for t in _LAYER_TYPES if isinstance(m, t)), None)
    return base is not None and type(m).forward is base.forward


def trace(
    model: nn.Module, *, train: bool = True, concrete_args: dict | None = None, prefix: str | None = None
) -> fx.GraphModule:
    """Trace ``model`` in the mode it will run in (train or eval) and name every node.

    The GraphModule shares parameters with ``model``; passes that modify modules copy first.
    ``concrete_args`` is FX's: ``{"x": [PH] * 5}`` traces a module that loops over a list of 5 tensors
    (a detection head's feature levels) as 5 inputs. ``prefix``: the module's path in a larger model,
    which its node names start with (``QUALNAME_PREFIX``).
    """
    model.train(train)
    tracer = GraphTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:  # FX raises many types; the user needs the model and the reason
        from cmtkd_graph.errors import UserError

        raise UserError(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(train)
    if prefix:
        gm.meta[QUALNAME_PREFIX] = prefix
    assign_qualnames(gm)
    return gm


def assign_qualnames(gm: fx.GraphModule) -> None:
    """Give every node without one a torchvision-style ``qualname`` (unique within the graph; under the
    graph's ``QUALNAME_PREFIX`` where it has one)."""
    seen: Counter[str] = Counter(n.meta[QUALNAME] for n in gm.graph.nodes if QUALNAME in n.meta)
    for node in gm.graph.nodes:
        if QUALNAME in node.meta:
            continue
        base = _base_name(node)
        if node.op not in ("placeholder", "output"):
            base = target_qualname(gm, base)
        count = seen[base]
        seen[base] += 1
        node.meta[QUALNAME] = base if count == 0 else f"{base}_{count}"


def _base_name(node: fx.Node) -> str:
    if node.op == "output":
        return "output"
    if node.op == "placeholder":
        return node.name
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    scope = _scope(node)
    op_name = _FX_SUFFIX.sub("", node.name)
    return f"{scope}.{op_name}" if scope else op_name


def _scope(node: fx.Node) -> str:
    """Path of the module whose forward created ``node`` ('' at the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


def target_qualname(gm: fx.GraphModule, target: str) -> str:
    """The node name of module path ``target`` of ``gm``: the path under the graph's prefix, if any."""
    prefix = gm.meta.get(QUALNAME_PREFIX)
    return f"{prefix}.{target}" if prefix else target


def local_name(gm: fx.GraphModule, name: str) -> str:
    """A node name without the graph's prefix: the module path it stands for inside ``gm``."""
    prefix = gm.meta.get(QUALNAME_PREFIX)
    return name.removeprefix(f"{prefix}.") if prefix else name


def qualname(node: fx.Node) -> str:
    """A node's torchvision-style name (falls back to the FX name)."""
    return node.meta.get(QUALNAME, node.name)


def nodes_by_qualname(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {qualname(n): n for n in gm.graph.nodes}


def copy_graph_module(gm: fx.GraphModule, *, tensors: str = "share") -> fx.GraphModule:
    """A copy of ``gm``'s modules and graph (with node metadata) for a pass to rewrite.

    ``tensors="share"``: parameters and buffers are the same tensor objects as in ``gm`` (passes
    restructure modules, they never write into weights, and copying weights on every pass is slow).
    ``tensors="meta"``: parameters and buffers are replaced by meta tensors (for shape propagation).

    Modules are copied structurally (their attributes, with fresh containers) rather than through
    ``copy.deepcopy``, whose generic walk over every module's hook dictionaries cost as much as
    tracing the model again.
    """
    import copy

    def convert(t: torch.Tensor) -> torch.Tensor:
        if tensors == "share":
            return t
        meta = torch.empty_like(t, device="meta")
        return nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta

    memo: dict[int, object] = {}
    holder = nn.Module()
    for name, value in gm.__dict__["_modules"].items():
        holder._modules[name] = None if value is None else _copy_module(value, memo, convert)
    for name, value in itertools.chain(gm._parameters.items(), gm._buffers.items()):
        setattr(holder, name, None if value is None else _copy_value(value, memo, convert))
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(holder, graph, type(gm).__name__)
    new.meta = copy.copy(gm.meta)
    for name, value in new.meta.get(PRESERVED_ATTRIBUTES, {}).items():  # as FX's own deepcopy does
        setattr(new, name, value)
    for old_node, new_node in zip(gm.graph.nodes, new.graph.nodes, strict=True):
        new_node.meta = copy.copy(old_node.meta)
    new.train(gm.training)
    return new


def _copy_module(module: nn.Module, memo: dict[int, object], convert) -> nn.Module:
    """``module`` and its children as new objects: tensors through ``convert``, containers (hook
    dictionaries, a builder's lists) copied one level deep, everything else shared (ints, tuples, types).
    A module reachable twice is copied once."""
    if id(module) in memo:
        return memo[id(module)]
    new = object.__new__(type(module))
    memo[id(module)] = new
    new.__dict__ = {name: _copy_value(value, memo, convert) for name, value in module.__dict__.items()}
    return new


def _copy_value(value, memo: dict[int, object], convert):
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = convert(value)
        return memo[id(value)]
    if isinstance(value, nn.Module):
        return _copy_module(value, memo, convert)
    if isinstance(value, dict):  # _parameters, _buffers, _modules, hooks (OrderedDicts keep their type)
        copied = value.copy()
        for key, item in value.items():
            if isinstance(item, torch.Tensor | nn.Module):
                copied[key] = _copy_value(item, memo, convert)
        return copied
    if isinstance(value, list | set):
        return value.copy()
    return value


def replace_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Install ``module`` at dotted path ``target`` (replacing what is there)."""
    parent_path, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def unique_target(gm: fx.GraphModule, target: str) -> str:
    """``target`` or ``target_1``, ``target_2``... whichever is not yet an attribute path."""
    candidate, i = target, 0
    while _exists(gm, candidate):
        i += 1
        candidate = f"{target}_{i}"
    return candidate


def _exists(gm: fx.GraphModule, target: str) -> bool:
    obj: object = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


__all__ = [
    "PRESERVED_ATTRIBUTES",
    "QUALNAME",
    "QUALNAME_PREFIX",
    "GraphTracer",
    "assign_qualnames",
    "copy_graph_module",
    "local_name",
    "nodes_by_qualname",
    "qualname",
    "replace_submodule",
    "target_qualname",
    "trace",
    "unique_target",
]
