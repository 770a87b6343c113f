"""``method: single`` — the student alone, trained with cross-entropy (the paper's baselines;
docs/methods.md#single)."""

from __future__ import annotations

from torch import Tensor

from cmtkd_graph.methods.base import Method, MethodContext, register_method
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput


@register_method("single")
class Single(Method):
    summary = "the student alone (baselines, and the way to train teachers for the other methods)"
    source = "the paper's single-model rows (docs/methods.md#single)"
    formula = "alpha CE_S"
    arrangement = "none"
    max_teachers = 0

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        terms = self.student_ce(out, labels)
        terms["total"] = self.distill.alpha * terms["ce_student"]
        return terms

    @classmethod
    def describe(cls, spec: Spec) -> str:
        return f"{spec.distill.alpha:g} CE_S"
