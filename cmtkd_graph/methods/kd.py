"""``method: kd`` — Hinton KD from one teacher (loaded and frozen, or trained alongside).

The teacher goes through the composition pass like CMT-KD's (one teacher, so its fusion nodes pass
its features through unchanged); with a feature loss the student also mimics its tap features.

Equations, defaults and their sources: docs/methods.md#kd.
"""

from __future__ import annotations

from torch import Tensor

from cmtkd_graph import losses
from cmtkd_graph.methods.base import LogitsLoss, Method, MethodContext, feature_text, register_method
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput


@register_method("kd")
class KD(Method):
    summary = "Hinton KD from one teacher (optionally with a feature loss at the taps)"
    formula = (
        "alpha (CE_S [+ CE_T if the teacher trains]) + beta KD_S [+ gamma sum_l d(F_T^l, F_S^l)], "
        "KD_S = tau^2 KL(softmax(z_T / tau) || softmax(z_S / tau)), z_T detached"
    )
    source = "Hinton, Vinyals, Dean 2015; weights as CMT-KD's (docs/methods.md#kd)"
    arrangement = "composed"
    min_teachers = max_teachers = 1
    feature_losses = ("none", "attention", "fitnet")

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.distill
        terms, total = self.cross_entropy_terms(ctx, out, labels)
        terms["kd_student"] = losses.soft_kl(out.teacher_logits.detach(), out.student_logits, d.tau)
        total = total + d.beta * terms["kd_student"]
        terms["total"] = self.add_feature_terms(ctx, out, terms, total)
        return terms

    def logits_loss(self) -> LogitsLoss:
        return LogitsLoss("KD", "combined")

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d = spec.distill
        return f"{d.alpha:g} CE_S + {d.beta:g} KD_S (from the teacher, tau {d.tau:g})" + feature_text(spec)
