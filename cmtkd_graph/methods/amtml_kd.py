"""``method: amtml_kd`` — Adaptive Multi-Teacher Multi-level KD (Liu, Zhang, Wang, Neurocomputing 2020).

Following the official code (FLHonker/AMTML-KD-code):

* K pretrained teachers, frozen; they may differ from the student and from each other;
* instance-level teacher importance: latent vectors theta_k in R^C and W in R^C,
  beta(x) = global max-pool of the student's last feature map (C channels),
  a_k(x) = (beta(x) * theta_k) . W, w(x) = softmax_k a(x); the integrated soft target is
  p_T(x) = sum_k w_k(x) softmax(z_k / T);
* loss (1 - a) CE + a 2 T^2 KL(p_T || softmax(z_S / T)) + 0.1 (|W|^2 + sum_k |theta_k|^2), a = 0.7,
  T = 5: here alpha = 1 - a = 0.3 and beta = 2a = 1.4 weigh CE_S and KD_S = T^2 KL;
* multi-level hints: student tap j learns from teacher (j mod K) at tap j (attention, weight 1);
* the two-phase schedule (student + weighting module, then the student alone): ``weighting_epochs``.

Departures, stated in the spec reference: the KL is the true KL (``batchmean``) where the notebooks
use ``KLDivLoss``'s mean over all elements (1/classes of it); the notebooks' extra RKD terms on the
logits are not part of the method as published and are left out. The gradient of the KD term reaches
the weighting module through p_T and the student through both its logits and beta(x), as in the code
(nothing there is detached but the teachers).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, fx, nn

from cmtkd_graph import losses
from cmtkd_graph.errors import UserError
from cmtkd_graph.methods.base import (
    BuildContext,
    LogitsLoss,
    Method,
    MethodContext,
    MethodOptions,
    feature_text,
    register_method,
)
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput, combined_from_probabilities

LAST_FEATURE_MAP = "last_feature_map"
INSTANCE = "instance"  # logged as importance/instance, plotted in importance.png


class InstanceWeighting(nn.Module):
    """w(x) = softmax_k((beta(x) * theta_k) . W), beta(x) the global max-pool of a feature map.

    Initialised as the official code does (standard normal theta and W).
    """

    def __init__(self, num_teachers: int, channels: int):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(num_teachers, channels))
        self.w = nn.Parameter(torch.randn(channels))

    def forward(self, feature_map: Tensor) -> Tensor:
        """Teacher weights [B, K] for a feature map [B, C, H, W] (or tokens [B, N, C])."""
        x = feature_map.float()
        beta = x.amax(dim=(2, 3)) if x.dim() == 4 else x.amax(dim=1)  # [B, C]
        scores = (beta.unsqueeze(1) * self.theta.float().unsqueeze(0)) @ self.w.float()  # [B, K]
        return torch.softmax(scores, dim=1)

    def penalty(self) -> Tensor:
        """|W|^2 + sum_k |theta_k|^2."""
        return self.w.float().pow(2).sum() + self.theta.float().pow(2).sum()

    def extra_repr(self) -> str:
        return f"teachers={self.theta.shape[0]}, channels={self.theta.shape[1]}"


class AMTMLOptions(MethodOptions):
    feature_node: str = Field(
        "auto",
        description="student node whose global max-pool is beta(x): a node name, a module prefix, or auto "
        "(the last feature map before the classifier)",
    )
    weighting_decay: float = Field(0.1, ge=0, description="weight of |W|^2 + sum_k |theta_k|^2")
    weighting_lr: float | None = Field(None, gt=0, description="lr of theta and W (default: optim.lr)")
    weighting_epochs: int | None = Field(
        None,
        ge=1,
        description="two-phase schedule: theta and W train for this many epochs, then stay frozen while "
        "the student trains on (default: they train throughout)",
    )


@register_method("amtml_kd")
class AMTMLKD(Method):
    summary = (
        "adaptive multi-teacher multi-level KD: frozen teachers weighted per instance by a learned "
        "module, hints from teacher (j mod K) at student tap j"
    )
    formula = (
        "alpha CE_S + beta tau^2 KL(p_T || softmax(z_S / tau)) + gamma sum_j d(F_{j mod K}^j, F_S^j) "
        "+ weighting_decay (|W|^2 + sum_k |theta_k|^2), p_T = sum_k w_k(x) softmax(z_k / tau)"
    )
    source = (
        "Liu, Zhang, Wang, Neurocomputing 2020, official code FLHonker/AMTML-KD-code "
        "(a = 0.7 -> alpha = 1 - a,"
        " beta = 2a; T = 5; hint weight 1); KL with batchmean (the notebooks' KLDivLoss averages over "
        "classes too); the notebooks' RKD terms are left out"
    )
    arrangement = "side_by_side"
    min_teachers = 1
    frozen_teachers_only = True
    feature_losses = ("attention", "fitnet", "none")
    defaults: ClassVar[dict[str, float]] = {"alpha": 0.3, "beta": 1.4, "tau": 5.0}
    gamma_defaults: ClassVar[dict[str, float]] = {"attention": 1.0, "fitnet": 1.0, "none": 0.0}
    Options = AMTMLOptions

    @classmethod
    def check(cls, spec: Spec, options: AMTMLOptions) -> None:
        if options.weighting_lr is None:
            options.weighting_lr = spec.optim.lr

    def hint_teacher(self, tap_index: int, num_teachers: int) -> int:
        return tap_index % num_teachers

    def student_extras(self, student: fx.GraphModule) -> dict[str, str]:
        from cmtkd_graph.passes.taps import last_feature_map, resolve_tap
        from cmtkd_graph.passes.tracer import qualname

        name = self.options.feature_node
        if name == "auto":
            return {LAST_FEATURE_MAP: last_feature_map(student)}
        return {LAST_FEATURE_MAP: qualname(resolve_tap(student, name, model="the student"))}

    def build_modules(self, ctx: BuildContext) -> nn.ModuleDict:
        from cmtkd_graph.passes.common import find_node
        from cmtkd_graph.passes.shapes import shape_of

        node = find_node(ctx.student, ctx.student_extras[LAST_FEATURE_MAP])
        shape = shape_of(node)
        if shape is None or len(shape) not in (3, 4):
            raise UserError(
                f"distill.options.feature_node: {node} has shape {shape}, not a feature map [B, C, H, W] "
                "or tokens [B, N, C]"
            )
        channels = shape[1] if len(shape) == 4 else shape[2]
        return nn.ModuleDict({"weighting": InstanceWeighting(len(ctx.teachers), channels)})

    def parameter_groups(self, ctx: MethodContext) -> list[dict]:
        return [
            {
                "name": "weighting",
                "params": list(ctx.modules["weighting"].parameters()),
                "lr": self.options.weighting_lr,
                "weight_decay": 0.0,  # the method's own penalty term regularises theta and W
                "until_epoch": self.options.weighting_epochs,
            }
        ]

    def complete(self, ctx: MethodContext, out: SystemOutput) -> None:
        weights = ctx.modules["weighting"](out.extras[LAST_FEATURE_MAP])
        out.extras["instance_weights"] = weights
        out.stats[INSTANCE] = weights.detach().mean(0)
        out.teacher_logits = combined_from_probabilities(
            tuple(z.detach() for z in out.each_teacher_logits), weights.detach()
        )

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d = self.distill
        weights = out.extras["instance_weights"]  # [B, K]: trains theta and W (and the student, via beta)
        probs = torch.stack([F.softmax(z.detach().float() / d.tau, dim=1) for z in out.each_teacher_logits])
        target = (weights.t().unsqueeze(-1) * probs).sum(0)  # p_T [B, classes]
        target = target.clamp_min(torch.finfo(target.dtype).tiny)  # finite gradients where p_T underflows
        terms = self.student_ce(out, labels)
        terms["kd_student"] = losses.soft_kl_from_probs(
            target, out.student_logits, d.tau, detach_target=False
        )
        total = d.alpha * terms["ce_student"] + d.beta * terms["kd_student"]
        terms["weighting_penalty"] = ctx.modules["weighting"].penalty()
        total = total + self.options.weighting_decay * terms["weighting_penalty"]
        terms["total"] = self.add_feature_terms(ctx, out, terms, total)
        return terms

    def logits_loss(self) -> LogitsLoss:
        return LogitsLoss("KD from the instance-weighted teachers", "each", "weighting", LAST_FEATURE_MAP)

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d, o = spec.distill, spec.distill.options
        phases = f", then frozen after epoch {o['weighting_epochs']}" if o.get("weighting_epochs") else ""
        return (
            f"{d.alpha:g} CE_S + {d.beta:g} KD_S (from the instance-weighted teachers, tau {d.tau:g})"
            + feature_text(spec)
            + (" (student tap j from teacher j mod K)" if d.feature_loss != "none" else "")
            + f" + {o['weighting_decay']:g} |W, theta|^2; weighting module lr {o['weighting_lr']:g}{phases}"
        )
