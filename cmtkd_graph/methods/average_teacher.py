"""``method: average_teacher`` — KD from the averaged softmax of separately trained, frozen teachers
(the paper's "average teacher" ablation). The teachers run side by side: nothing is fused.

Equations, defaults and their sources: docs/methods.md#average_teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmtkd_graph import losses
from cmtkd_graph.methods.base import LogitsLoss, Method, MethodContext, register_method
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput, combined_from_probabilities


@register_method("average_teacher")
class AverageTeacher(Method):
    summary = "KD from the averaged softmax of frozen, separately trained teachers"
    source = (
        "You et al., KDD 2017 (averaged soft targets); weights as CMT-KD's (docs/methods.md#average_teacher)"
    )
    formula = "alpha CE_S + beta tau^2 KL(mean_k softmax(z_k / tau) || softmax(z_S / tau))"
    arrangement = "side_by_side"
    min_teachers = 1
    frozen_teachers_only = True

    def complete(self, ctx: MethodContext, out: SystemOutput) -> None:
        out.teacher_logits = combined_from_probabilities(out.each_teacher_logits)

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.distill
        terms = self.student_ce(out, labels)
        target = torch.stack([F.softmax(z.detach().float() / d.tau, dim=1) for z in out.each_teacher_logits])
        terms["kd_student"] = losses.soft_kl_from_probs(target.mean(0), out.student_logits, d.tau)
        terms["total"] = d.alpha * terms["ce_student"] + d.beta * terms["kd_student"]
        return terms

    def logits_loss(self) -> LogitsLoss:
        return LogitsLoss("KD from averaged teachers", "each")

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d = spec.distill
        return f"{d.alpha:g} CE_S + {d.beta:g} KD_S (from the averaged teacher softmax, tau {d.tau:g})"
