"""How passes are written: in place on a GraphModule, made pure by ``@graph_pass``.

``@graph_pass`` turns ``fn(gm, **options) -> None`` (rewrites ``gm`` in place) into the public pure
pass ``fn(gm, **options) -> GraphModule`` that works on a copy (weights shared, modules and graph
copied), checks the graph and regenerates its code. ``fn.in_place`` is the in-place version, so a
pipeline that owns its graph (``cmtkd_graph.system.build_network``) skips the copies and recompiles
once at the end: copying and code generation dominated build times for large models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from cmtkd_graph.passes.tracer import copy_graph_module
from torch import fx, nn

InPlacePass = Callable[..., None]


def graph_pass(fn: InPlacePass) -> Callable[..., fx.GraphModule]:
    """Decorator: the pure version of an in-place pass, with the original as ``.in_place``."""

    @functools.wraps(fn)
    def pure(gm: fx.GraphModule, *args: Any, **kwargs: Any) -> fx.GraphModule:
        new = copy_graph_module(gm)
        fn(new, *args, **kwargs)
        return finish(new)

    pure.in_place = fn  # type: ignore[attr-defined]
    return pure


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Check the graph and regenerate ``gm.forward`` after in-place passes."""
    gm.graph.lint()
    gm.recompile()
    return gm


def network_graphs(network: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """``[("", network)]`` for a network that traces whole; else each rewritten part with its path and a
    dot (``("rpn.head.", graph)``)."""
    if isinstance(network, fx.GraphModule):
        return [("", network)]
    return [(f"{path}.", m) for path, m in network.named_modules() if path and isinstance(m, fx.GraphModule)]


def graph_modules(module: nn.Module | None) -> list[fx.GraphModule]:
    """The graphs of a network: the network itself where it traces whole, its rewritten parts where it
    does not (RAFT: ``cmtkd_graph.models.parts``), every copied teacher's in a composed graph (none: [])."""
    return [] if module is None else [m for m in module.modules() if isinstance(m, fx.GraphModule)]
