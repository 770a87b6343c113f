"""``method: cmtkd`` — the paper (Pham, Hoang, Do, WACV 2023; docs/methods.md#cmtkd).

Quantized teachers composed into one graph: at every tap an importance-weighted fusion forms the
shared knowledge F^l, which feeds every teacher's next layers and is distilled into the student;
the combined teacher z_T (output fusion) and the student learn from each other (KDCL-MinLogit).
"""

from __future__ import annotations

from torch import Tensor

from cmtkd_graph import losses
from cmtkd_graph.methods.base import (
    FEATURE_LOSSES,
    LogitsLoss,
    Method,
    MethodContext,
    feature_text,
    register_method,
)
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput


@register_method("cmtkd")
class CMTKD(Method):
    summary = (
        "collaborative multi-teacher KD (the paper): teachers composed with shared knowledge at the "
        "taps, KDCL-MinLogit mutual learning"
    )
    formula = "alpha (CE_T + CE_S) + beta (KL_T + KL_S) + gamma sum_l d(F^l, F_S^l)"
    source = "Pham, Hoang, Do, WACV 2023 (docs/methods.md#cmtkd)"
    arrangement = "composed"
    min_teachers = 1
    feature_losses = FEATURE_LOSSES
    mutual_learning = True

    def fuses_at_taps(self) -> bool:
        return True  # the shared knowledge feeds the teachers even without a feature loss

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.distill
        terms, total = self.cross_entropy_terms(ctx, out, labels)
        if d.mutual_learning:
            z = losses.kdcl_min_logit(
                out.teacher_logits, out.student_logits, labels, may_ignore=ctx.labels_may_ignore
            )
            terms["kl_student"] = losses.soft_kl(z, out.student_logits, d.tau)
            terms["kl_teacher"] = losses.soft_kl(z, out.teacher_logits, d.tau)
            total = total + d.beta * (terms["kl_student"] + terms["kl_teacher"])
        terms["total"] = self.add_feature_terms(ctx, out, terms, total)
        return terms

    def logits_loss(self) -> LogitsLoss | None:
        return LogitsLoss("KDCL-MinLogit KL (mutual)", "combined") if self.distill.mutual_learning else None

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d = spec.distill
        text = f"{d.alpha:g} (CE_T + CE_S)"
        if d.mutual_learning:
            text += f" + {d.beta:g} (KL_T + KL_S) [KDCL-MinLogit, tau {d.tau:g}]"
        return text + feature_text(spec) + f"; combined teacher: {d.combine}"
