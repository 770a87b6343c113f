"""torch.fx graph passes: tracing, activation rewriting, surgery, quantization, taps, composition,
in-place activations where safe, activation checkpointing.

Installed as ``cmtkd_graph.passes``. Each pass is a pure function ``GraphModule -> GraphModule``
(``pass_.in_place`` rewrites its argument instead, see ``graph_pass``).
"""

from cmtkd_graph.passes.activations import (
    explicit_activations,
    functional_to_modules,
    remove_inplace,
    unshare_modules,
)
from cmtkd_graph.passes.compose import compose_teachers
from cmtkd_graph.passes.graph_pass import finish, graph_pass
from cmtkd_graph.passes.inplace import inplace_where_safe
from cmtkd_graph.passes.outputs import expose_taps, keep_main_output
from cmtkd_graph.passes.quantize import quantize
from cmtkd_graph.passes.recompute import checkpoint_segments
from cmtkd_graph.passes.shapes import propagate_shapes
from cmtkd_graph.passes.surgery import SURGERIES, run_surgery
from cmtkd_graph.passes.taps import Tap, resolve_tap, resolve_taps
from cmtkd_graph.passes.tracer import qualname, trace

__all__ = [
    "SURGERIES",
    "Tap",
    "checkpoint_segments",
    "compose_teachers",
    "explicit_activations",
    "expose_taps",
    "finish",
    "functional_to_modules",
    "graph_pass",
    "inplace_where_safe",
    "keep_main_output",
    "propagate_shapes",
    "qualname",
    "quantize",
    "remove_inplace",
    "resolve_tap",
    "resolve_taps",
    "run_surgery",
    "trace",
    "unshare_modules",
]
