"""Make every activation an explicit, unshared, out-of-place module call.

Quantizers go on the input edges of layers and taps can be any activation, so activations must be
real nodes with their own modules:

* ``functional_to_modules`` — ``F.relu(x)`` (GoogLeNet, Inception, DenseNet) becomes a call of a new
  ``nn.ReLU`` registered under the node's name; ``F.dropout(x, training=...)`` becomes ``nn.Dropout``
  so train/eval is decided at run time, not frozen at trace time.
* ``unshare_modules`` — each call site of a parameter-free module used several times (ResNet's
  ``relu``) gets its own copy, named like the node (``layer1.0.relu_1``).
* ``remove_inplace`` — in-place ops become out-of-place: after composition a tensor (the shared
  knowledge) may feed several consumers, and an in-place ReLU in one would corrupt the others.
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cmtkd_graph.passes.graph_pass import graph_pass
from cmtkd_graph.passes.tracer import local_name, qualname, target_qualname, unique_target
from torch import fx, nn


def _relu(args, kwargs):
    return nn.ReLU()


def _relu6(args, kwargs):
    return nn.ReLU6()


def _hardtanh(args, kwargs):
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return nn.Hardtanh(lo, hi)


def _gelu(args, kwargs):
    return nn.GELU(approximate=kwargs.get("approximate", "none"))


def _leaky_relu(args, kwargs):
    return nn.LeakyReLU(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))


def _dropout(args, kwargs):
    return nn.Dropout(kwargs.get("p", args[1] if len(args) > 1 else 0.5))


# function -> builder of the equivalent module from the call's (args, kwargs)
_FUNCTIONAL: dict[Callable, Callable[[tuple, dict], nn.Module]] = {
    F.relu: _relu,
    torch.relu: _relu,
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
    F.gelu: _gelu,
    F.silu: lambda a, k: nn.SiLU(),
    F.hardswish: lambda a, k: nn.Hardswish(),
    F.hardsigmoid: lambda a, k: nn.Hardsigmoid(),
    F.leaky_relu: _leaky_relu,
    torch.sigmoid: lambda a, k: nn.Sigmoid(),
    F.sigmoid: lambda a, k: nn.Sigmoid(),
    torch.tanh: lambda a, k: nn.Tanh(),
    F.tanh: lambda a, k: nn.Tanh(),
    F.dropout: _dropout,
}
_METHODS: dict[str, Callable[[tuple, dict], nn.Module]] = {
    "relu": _relu,
    "relu_": _relu,
    "sigmoid": lambda a, k: nn.Sigmoid(),
    "tanh": lambda a, k: nn.Tanh(),
}
_INPLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
    F.relu_: F.relu,
}
_INPLACE_METHODS = {
    "add_": "add",
    "mul_": "mul",
    "sub_": "sub",
    "div_": "div",
    "clamp_": "clamp",
    "relu_": "relu",
}


@graph_pass
def functional_to_modules(gm: fx.GraphModule) -> None:
    """Replace functional activation / dropout calls by calls of new modules named after the node."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _FUNCTIONAL:
            make = _FUNCTIONAL[node.target]
        elif node.op == "call_method" and node.target in _METHODS:
            make = _METHODS[node.target]
        else:
            continue
        module = make(node.args, dict(node.kwargs))
        target = unique_target(gm, local_name(gm, qualname(node)))
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (node.args[0],))
        new.meta = dict(node.meta)
        new.meta["qualname"] = target_qualname(gm, target)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


@graph_pass
def unshare_modules(gm: fx.GraphModule) -> None:
    """Give every call site of a parameter-free, buffer-free module its own copy.

    Modules with parameters or buffers called several times (weight sharing) stay shared.
    """
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    for target, nodes in calls.items():
        module = gm.get_submodule(target)
        if len(nodes) < 2 or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            continue
        for node in nodes[1:]:
            new_target = unique_target(gm, local_name(gm, qualname(node)))
            gm.add_submodule(new_target, copy.deepcopy(module))
            node.target = new_target
            node.meta["qualname"] = target_qualname(gm, new_target)


@graph_pass
def remove_inplace(gm: fx.GraphModule) -> None:
    """Turn in-place modules, functions and methods into their out-of-place forms (same values)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        elif node.op == "call_function":
            if node.target in _INPLACE_FUNCTIONS:
                node.target = _INPLACE_FUNCTIONS[node.target]
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]


@graph_pass
def explicit_activations(gm: fx.GraphModule) -> None:
    """All three rewrites: functional -> modules, unshared call sites, no in-place ops."""
    functional_to_modules.in_place(gm)
    unshare_modules.in_place(gm)
    remove_inplace.in_place(gm)
