"""The training objective of each method, term by term (METHOD.md §4-6, eq. 10).

``cmtkd``:  L = alpha (CE_T + CE_S) + beta (KL_T + KL_S) + gamma L_KD
  CE_T / CE_S   cross-entropy of the combined teacher z_T and of the student z_S;
  KL_T / KL_S   KDCL-MinLogit mutual learning: both distil from z = min(z_T - z_T,c, z_S - z_S,c)
                (absent, not zero-weighted, with ``mutual_learning: false``);
  L_KD          sum over taps of d(F^l, F_S^l), attention or FitNet (absent with ``feature_loss: none``).
``single``:          L = alpha CE_S.
``kd``:              L = alpha (CE_S [+ CE_T if the teacher trains]) + beta KD_S [+ gamma L_KD],
                     KD_S = tau^2 KL(softmax(z_T / tau) || softmax(z_S / tau)) with z_T detached (Hinton).
``average_teacher``: L = alpha CE_S + beta KD_S with the target mean_k softmax(z_k / tau) of frozen teachers.

Every term is returned separately, plus ``total``, so training can log them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmtkd_graph import losses
from cmtkd_graph.spec import DistillSpec, Method


@dataclass
class SystemOutput:
    """What the system computes for a batch (all logits [B, classes], features keyed by tap name)."""

    student_logits: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_logits: Tensor | None = None  # the combined teacher z_T
    each_teacher_logits: tuple[Tensor, ...] = ()
    shared_features: dict[str, Tensor] = field(default_factory=dict)


def combined_from_probabilities(each_logits: tuple[Tensor, ...]) -> Tensor:
    """Logits whose softmax is the average of the teachers' softmax (the 'average teacher')."""
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in each_logits]).mean(0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class Objective:
    """Computes the loss terms of one method from a :class:`SystemOutput` and labels."""

    def __init__(
        self, method: Method, distill: DistillSpec, *, teacher_trains: bool, adapters: nn.ModuleDict
    ):
        self.method = method
        self.d = distill
        self.teacher_trains = teacher_trains
        self.adapters = adapters

    def __call__(self, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.d
        terms: dict[str, Tensor] = {"ce_student": F.cross_entropy(out.student_logits.float(), labels)}
        total = d.alpha * terms["ce_student"]
        if self.method in ("cmtkd", "kd") and self.teacher_trains:
            terms["ce_teacher"] = F.cross_entropy(out.teacher_logits.float(), labels)
            total = total + d.alpha * terms["ce_teacher"]
        if self.method == "cmtkd" and d.mutual_learning:
            z = losses.kdcl_min_logit(out.teacher_logits, out.student_logits, labels)
            terms["kl_student"] = losses.soft_kl(z, out.student_logits, d.tau)
            terms["kl_teacher"] = losses.soft_kl(z, out.teacher_logits, d.tau)
            total = total + d.beta * (terms["kl_student"] + terms["kl_teacher"])
        elif self.method == "kd":
            terms["kd_student"] = losses.soft_kl(out.teacher_logits.detach(), out.student_logits, d.tau)
            total = total + d.beta * terms["kd_student"]
        elif self.method == "average_teacher":
            target = torch.stack(
                [F.softmax(z.detach().float() / d.tau, dim=1) for z in out.each_teacher_logits]
            )
            terms["kd_student"] = losses.soft_kl_from_probs(target.mean(0), out.student_logits, d.tau)
            total = total + d.beta * terms["kd_student"]
        if d.feature_loss not in (None, "none") and out.shared_features:
            per_tap = self.feature_terms(out)
            terms.update({f"feature/{name}": value for name, value in per_tap.items()})
            terms["feature"] = torch.stack(list(per_tap.values())).sum()
            total = total + d.feature_weight * terms["feature"]
        terms["total"] = total
        return terms

    def feature_terms(self, out: SystemOutput) -> dict[str, Tensor]:
        """d(F^l, F_S^l) for every tap l (eq. 4-6)."""
        from cmtkd_graph.passes.compose import fusion_key

        result = {}
        for name, shared in out.shared_features.items():
            if self.d.detach_shared:
                shared = shared.detach()
            student = out.student_features[name]
            if self.d.feature_loss == "attention":
                result[name] = losses.attention_loss(shared, student)
            else:
                result[name] = losses.fitnet_loss(shared, self.adapters[fusion_key(name)](student))
        return result
