"""``method: ctkd`` — Collaborative Teaching KD (Zhao, Sun, Dong, Chen, Dong, *Highlight every step:
knowledge distillation via collaborative teaching*, arXiv 1907.09643, 2019), as its released code
computes it: github.com/HaoranZhao1988/CTKD, ``train.py`` and ``utils.py`` at commit 238e9fe.

Two teachers with different jobs: a **scratch teacher** (``teachers[0]``) trains from scratch with the
student, on the student's own stem convolution, and guides it step by step through its temporary
logits; a pretrained, frozen **expert teacher** (``teachers[1]``) passes on its attention maps:

    L = alpha (CE_S + CE_scratch) + beta ||sg(z_scratch) - z_S||^2 / B + gamma sum_j AT(F_G^j, F_expert^j)

where ``sg`` stops the gradient (the scratch teacher learns from the labels only), the squared distance
is summed over the batch and the classes, and G, the network the expert guides, is in the released
code the **scratch teacher** (``distill.options.expert_guides: scratch``, the default: the code zips
the expert's three groups with the first three of ``[g0, g1, g2, gs0, gs1, gs2]``, which are the
scratch teacher's), and in the paper's text the student (``expert_guides: student``).

Defaults and why: docs/methods.md#ctkd.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, fx

from cmtkd_graph.methods.base import (
    LogitsLoss,
    Method,
    MethodContext,
    MethodOptions,
    feature_text,
    register_method,
)
from cmtkd_graph.passes.share import share_first_layer_in_place
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput

SCRATCH, EXPERT = 0, 1


class CTKDOptions(MethodOptions):
    expert_guides: Literal["scratch", "student"] = Field(
        "scratch",
        description="whose tap features learn the expert's attention maps: the scratch teacher's (the "
        "released code) or the student's (the paper's text)",
    )
    share_stem: bool = Field(
        True,
        description="the scratch teacher computes with the student's first layer (the released code's "
        "shared conv0), where the two first layers have one shape",
    )


@register_method("ctkd")
class CTKD(Method):
    summary = (
        "collaborative teaching KD: a scratch teacher trained alongside teaches the logits, a frozen "
        "expert teacher the attention maps"
    )
    formula = (
        "alpha (CE_S + CE_scratch) + beta ||sg(z_scratch) - z_S||^2 / B "
        "+ gamma sum_l AT(F_G^l, F_expert^l), G the scratch teacher (released code) or the student"
    )
    source = (
        "Zhao et al. 2019, as the released code computes it (HaoranZhao1988/CTKD at 238e9fe): L2 on the "
        "logits, the expert's attention on the scratch teacher, a shared stem; the loss weights are this "
        "project's reading, the code's defaults being 0 (docs/methods.md#ctkd)"
    )
    revision = 2  # 1: the abstract's reading (KL from the scratch teacher, the expert guiding the student)
    arrangement = "side_by_side"
    min_teachers = max_teachers = 2
    teacher_roles = ("scratch", "expert")
    feature_losses = ("attention", "fitnet", "none")
    defaults: ClassVar[dict[str, float]] = {"alpha": 1.0, "beta": 0.5}
    gamma_defaults: ClassVar[dict[str, float]] = {"attention": 1000.0, "fitnet": 1.0, "none": 0.0}
    Options = CTKDOptions

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

    @classmethod
    def check(cls, spec: Spec, options: CTKDOptions) -> None:
        d = spec.distill
        if d.tau is not None:
            raise ValueError(
                "distill.tau: ctkd has no temperature (the scratch teacher's logits guide the student "
                "through a squared distance); remove it"
            )
        if options.expert_guides == "scratch" and d.feature_loss == "fitnet":
            raise ValueError(
                "distill.feature_loss: fitnet regresses the student's features; with the expert guiding "
                "the scratch teacher (distill.options.expert_guides: scratch) use attention or none"
            )

    def hint_teacher(self, tap_index: int, num_teachers: int) -> int:
        return EXPERT

    def hint_learner(self) -> int | None:
        return SCRATCH if self.options.expert_guides == "scratch" else None

    def share_parameters(self, student: fx.GraphModule, teachers: list[fx.GraphModule]) -> list[str]:
        if not self.options.share_stem:
            return []
        return [share_first_layer_in_place(student, teachers[SCRATCH], ("student", "scratch teacher"))]

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.distill
        scratch = out.each_teacher_logits[SCRATCH]
        terms = self.student_ce(out, labels)
        terms["ce_scratch"] = self.ce(scratch, labels)
        terms["l2_student"] = logit_distance(scratch.detach(), out.student_logits)
        total = d.alpha * (terms["ce_student"] + terms["ce_scratch"]) + d.beta * terms["l2_student"]
        terms["total"] = self.add_feature_terms(ctx, out, terms, total)  # on the hint learner's taps
        return terms

    def logits_loss(self) -> LogitsLoss:
        return LogitsLoss("L2 to the scratch teacher's logits", (SCRATCH,))

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d = spec.distill
        guided = d.options.get("expert_guides", "scratch")
        return (
            f"{d.alpha:g} (CE_S + CE_scratch) + {d.beta:g} ||z_scratch - z_S||^2 / B"
            + feature_text(spec)
            + (f" (from the expert teacher, on the {guided}'s taps)" if d.feature_loss != "none" else "")
        )


def logit_distance(target: Tensor, logits: Tensor) -> Tensor:
    """``((target - logits) ** 2).sum() / B``: the released code's step-by-step guidance, a squared
    distance summed over the classes and averaged over the batch."""
    return (target.float() - logits.float()).pow(2).sum() / logits.shape[0]
