"""Distillation methods, one module each, registered by name (see ``base.py`` for the record).

To add one: subclass :class:`Method` in your own module, decorate it with ``@register_method("name")``
and import that module before loading the spec (``method: name``). The built-in methods are imported
here: cmtkd, single, kd, average_teacher, amtml_kd, ctkd.
"""

from cmtkd_graph.methods import amtml_kd, average_teacher, cmtkd, ctkd, kd, single  # noqa: F401  (register)
from cmtkd_graph.methods.base import (
    BuildContext,
    LogitsLoss,
    Method,
    MethodContext,
    MethodOptions,
    feature_terms,
    method_for,
    register_method,
)
from cmtkd_graph.registry import METHODS

__all__ = [
    "METHODS",
    "BuildContext",
    "LogitsLoss",
    "Method",
    "MethodContext",
    "MethodOptions",
    "feature_terms",
    "method_for",
    "register_method",
]
