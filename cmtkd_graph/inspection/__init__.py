"""What was built, shown: the rewritten graphs as one networkx graph (``graph``), written as GraphML,
JSON, DOT, SVG or PNG or summarised as a table (``output``; ``cmtkd-graph inspect``), and the short
summaries of a spec and of a model's tap-able nodes (``summary``; ``cmtkd-graph validate`` and ``taps``).
"""

from cmtkd_graph.inspection.graph import block_view, read_importance, system_graph
from cmtkd_graph.inspection.output import summary_table, write_graph
from cmtkd_graph.inspection.summary import spec_summary, taps_table

__all__ = [
    "block_view",
    "read_importance",
    "spec_summary",
    "summary_table",
    "system_graph",
    "taps_table",
    "write_graph",
]
