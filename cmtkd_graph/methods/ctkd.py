"""``method: ctkd`` — Collaborative Teaching KD (Zhao et al., *Highlight every step: knowledge
distillation via collaborative teaching*, 2019).

Two teachers with different jobs: a **scratch teacher** (``teachers[0]``) trains from scratch with the
student and guides it step by step through its temporary logits; a pretrained **expert teacher**
(``teachers[1]``, frozen) guides the student's intermediate features to the critical regions through
attention maps. The loss weights are not in our sources; this project reads the method as

    L = alpha (CE_S + CE_scratch) + beta tau^2 KL(softmax(z_scratch / tau) || softmax(z_S / tau))
        + gamma sum_taps AT(F_expert, F_S)

with the scratch teacher's logits detached in the student's KD term (the scratch teacher learns from
the labels only) and defaults alpha 1, beta 1, tau 2, gamma 100 (attention; the weight CMT-KD uses).

The reading, its defaults and why: docs/methods.md#ctkd.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from cmtkd_graph import losses
from cmtkd_graph.methods.base import LogitsLoss, Method, MethodContext, feature_text, register_method
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput

SCRATCH, EXPERT = 0, 1


@register_method("ctkd")
class CTKD(Method):
    summary = (
        "collaborative teaching KD: a scratch teacher trained alongside teaches the logits, a frozen "
        "expert teacher the attention maps"
    )
    formula = (
        "alpha (CE_S + CE_scratch) + beta tau^2 KL(softmax(z_scratch / tau) || softmax(z_S / tau)) "
        "+ gamma sum_l AT(F_expert^l, F_S^l), z_scratch detached in the KL"
    )
    source = (
        "Zhao et al. 2019; no code was published and the abstract gives no loss weights: alpha 1, beta 1, "
        "tau 2, gamma 100 are this project's reading (docs/methods.md#ctkd)"
    )
    arrangement = "side_by_side"
    min_teachers = max_teachers = 2
    teacher_roles = ("scratch", "expert")
    feature_losses = ("attention", "fitnet", "none")
    defaults: ClassVar[dict[str, float]] = {"alpha": 1.0, "beta": 1.0, "tau": 2.0}

    @classmethod
    def check_teachers(cls, spec: Spec) -> None:
        super().check_teachers(spec)
        scratch, expert = spec.teachers
        if not scratch.trainable:
            raise ValueError(
                "teachers[0]: the scratch teacher trains together with the student; set `trainable: true`"
            )
        if scratch.weights is not None:
            raise ValueError(
                "teachers[0].weights: the scratch teacher trains from scratch together with the student; "
                "remove `weights:` (the pretrained teacher is the expert, teachers[1])"
            )
        if expert.weights is None or expert.trainable:
            raise ValueError(
                "teachers[1]: the expert teacher is pretrained and frozen; give `weights:` (a checkpoint) "
                "and `trainable: false`"
            )

    def hint_teacher(self, tap_index: int, num_teachers: int) -> int:
        return EXPERT

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.distill
        scratch = out.each_teacher_logits[SCRATCH]
        terms = self.student_ce(out, labels)
        terms["ce_scratch"] = F.cross_entropy(scratch.float(), labels)
        terms["kd_student"] = losses.soft_kl(scratch.detach(), out.student_logits, d.tau)
        total = d.alpha * (terms["ce_student"] + terms["ce_scratch"]) + d.beta * terms["kd_student"]
        terms["total"] = self.add_feature_terms(ctx, out, terms, total)
        return terms

    def logits_loss(self) -> LogitsLoss:
        return LogitsLoss("KD from the scratch teacher", (SCRATCH,))

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d = spec.distill
        return (
            f"{d.alpha:g} (CE_S + CE_scratch) + {d.beta:g} KD_S (from the scratch teacher, tau {d.tau:g})"
            + feature_text(spec)
            + (" (from the expert teacher)" if d.feature_loss != "none" else "")
        )
