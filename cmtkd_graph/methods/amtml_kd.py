"""``method: amtml_kd`` — Adaptive Multi-Teacher Multi-level KD (Liu, Zhang, Wang, Neurocomputing 2020).

By default as the official code runs it (FLHonker/AMTML-KD-code, ``LR_adaptive_AT.ipynb`` and
``metric/loss.py``; docs/methods.md#amtml_kd holds the equations, every default's source and the
departures that remain):

* K pretrained teachers, frozen; they may differ from the student and from each other;
* instance-level teacher importance: latent vectors theta_k in R^C and W in R^C (standard normal),
  beta(x) = the student's globally pooled last feature map (average pooling, as the code's max-pool of
  the already average-pooled 1x1 feature; ``beta_pooling: max`` pools the map by its maximum, as the
  paper's Figure 2 draws it), a_k(x) = (beta(x) * theta_k) . W, w(x) = softmax_k a(x), and the
  integrated soft target p_T(x) = sum_k w_k(x) softmax(z_k / T);
* loss (1 - a) CE + 2 a T^2 KLDivLoss(log softmax(z_S / T), p_T) + sum_j AT(student tap j, teacher
  (j mod K) tap j) + RKD angle + RKD distance (z_S against p_T) + 0.1 (|W|^2 + sum_k |theta_k|^2) in
  phase 1, with a = 0.7 (alpha = 0.3, beta = 1.4), T = 5; ``nn.KLDivLoss()`` averages over batch x
  classes, so the KD term is 1/C of a batch-mean KL (``kl_reduction``);
* two phases: phase 1 trains the student (constant lr) and theta, W (lr x gamma at two milestones);
  phase 2 trains the student alone on a fresh multistep schedule. The code's lengths are 80 + 200
  epochs; a run of another length keeps their proportions (``weighting_epochs`` and the milestones,
  resolved into the saved spec).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

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

# The official code's schedule: train_adapter(80), then 200 epochs of the student alone. Its schedulers
# are stepped at the start of every epoch, so the lr drops one epoch before the milestones it names
# ([40, 50] and [100, 150]): from epoch 39 and 49 of phase 1 and 99 and 149 of phase 2 (0-based).
OFFICIAL_PHASE_1, OFFICIAL_PHASE_2 = 80, 200
OFFICIAL_WEIGHTING_DROPS = (39, 49)
OFFICIAL_STUDENT_DROPS = (99, 149)


class InstanceWeighting(nn.Module):
    """w(x) = softmax_k((beta(x) * theta_k) . W), beta(x) the global pooling of a feature map.

    Initialised as the official code does (standard normal theta and W).
    """

    def __init__(self, num_teachers: int, channels: int, pooling: Literal["average", "max"] = "average"):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(num_teachers, channels))
        self.w = nn.Parameter(torch.randn(channels))
        self.pooling = pooling

    def forward(self, feature_map: Tensor) -> Tensor:
        """Teacher weights [B, K] for a feature map [B, C, (T,) H, W] (or tokens [B, N, C])."""
        x = feature_map.float()
        dims = tuple(range(2, x.dim())) if x.dim() >= 4 else (1,)
        beta = x.mean(dim=dims) if self.pooling == "average" else x.amax(dim=dims)  # [B, C]
        scores = (beta.unsqueeze(1) * self.theta.float().unsqueeze(0)) @ self.w.float()  # [B, K]
        return torch.softmax(scores, dim=1)

    def penalty(self) -> Tensor:
        """|W|^2 + sum_k |theta_k|^2."""
        return self.w.float().pow(2).sum() + self.theta.float().pow(2).sum()

    def extra_repr(self) -> str:
        return f"teachers={self.theta.shape[0]}, channels={self.theta.shape[1]}, pooling={self.pooling}"


class AMTMLOptions(MethodOptions):
    kl_reduction: Literal["elementwise_mean", "batchmean"] = Field(
        "elementwise_mean",
        description="elementwise_mean: the KL averaged over batch x classes, as the official nn.KLDivLoss() "
        "(the KD term is 1/C of a batch-mean KL); batchmean: the true KL, C times stronger",
    )
    angle_weight: float = Field(1.0, ge=0, description="weight of the RKD angle loss (z_S against p_T)")
    distance_weight: float = Field(1.0, ge=0, description="weight of the RKD distance loss (z_S against p_T)")
    beta_pooling: Literal["average", "max"] = Field(
        "average",
        description="beta(x): average (the official code: the average-pooled feature) or max (the paper's "
        "Figure 2) pooling of the feature_node map",
    )
    feature_node: str = Field(
        "auto",
        description="student node whose global pooling is beta(x): a node name, a module prefix, or auto "
        "(the last feature map before the classifier)",
    )
    weighting_decay: float = Field(0.1, ge=0, description="weight of |W|^2 + sum_k |theta_k|^2 (phase 1)")
    weighting_lr: float | None = Field(None, gt=0, description="lr of theta and W (default: optim.lr)")
    two_phase: bool = Field(
        True,
        description="true: the official two phases (below), which replace optim.schedule; false: one "
        "phase on optim.schedule, theta and W training throughout or for weighting_epochs",
    )
    weighting_epochs: float | None = Field(
        None,
        gt=0,
        description="phase 1 length in epochs: student + weighting module (default: 80 of every 280 "
        "epochs, the official proportion); then the student trains alone",
    )
    weighting_milestones: list[float] | None = Field(
        None,
        description="phase 1: epochs at which theta and W's lr *= optim.schedule.gamma; the student's lr "
        "is constant (default: the official 39 and 49 of 80, scaled)",
    )
    student_milestones: list[float] | None = Field(
        None,
        description="phase 2: epochs from its start at which the student's lr *= optim.schedule.gamma "
        "(default: the official 99 and 149 of 200, scaled)",
    )


@register_method("amtml_kd")
class AMTMLKD(Method):
    summary = (
        "adaptive multi-teacher multi-level KD: frozen teachers weighted per instance by a learned "
        "module, hints from teacher (j mod K) at student tap j"
    )
    formula = (
        "alpha CE_S + beta tau^2 KL(p_T || softmax(z_S / tau)) [/ C] + gamma sum_j d(F_{j mod K}^j, F_S^j) "
        "+ angle_weight RKD_angle(z_S, p_T) + distance_weight RKD_distance(z_S, p_T) "
        "+ weighting_decay (|W|^2 + sum_k |theta_k|^2) [phase 1], p_T = sum_k w_k(x) softmax(z_k / tau)"
    )
    source = (
        "Liu, Zhang, Wang, Neurocomputing 2020; official code FLHonker/AMTML-KD-code (LR_adaptive_AT.ipynb, "
        "metric/loss.py): a = 0.7 -> alpha = 1 - a, beta = 2a; T = 5; hint, angle and distance weights 1; "
        "decay 0.1; phases 80 + 200 epochs (docs/methods.md#amtml_kd)"
    )
    arrangement = "side_by_side"
    tasks = ("classification",)
    tasks_reason = (
        "its teacher weights are learned per image from the last feature map and its relational terms "
        "compare every pair of samples (per pixel, (H W)^2 pairs)"
    )
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
        if options.two_phase:
            cls._resolve_phases(spec, options)
        elif options.weighting_milestones is not None or options.student_milestones is not None:
            raise ValueError(
                "distill.options: weighting_milestones and student_milestones belong to the two phases; "
                "with two_phase: false theta and W follow optim.schedule"
            )

    @staticmethod
    def _resolve_phases(spec: Spec, options: AMTMLOptions) -> None:
        """Phase lengths and milestones: given, or the official ones in proportion to train.epochs."""
        schedule, epochs = spec.optim.schedule, spec.train.epochs
        if schedule.name != "multistep" or schedule.milestones or schedule.warmup_epochs:
            raise ValueError(
                "optim.schedule: amtml_kd's two phases set the schedule of each phase (distill.options."
                "weighting_milestones, student_milestones); keep optim.schedule a multistep without "
                "milestones or warm-up (its gamma applies), or set distill.options.two_phase: false"
            )
        total = OFFICIAL_PHASE_1 + OFFICIAL_PHASE_2
        if options.weighting_epochs is None:
            options.weighting_epochs = round(epochs * OFFICIAL_PHASE_1 / total, 2)
        phase_1 = options.weighting_epochs
        phase_2 = epochs - phase_1
        if phase_2 <= 0:
            raise ValueError(
                f"distill.options.weighting_epochs: phase 1 ({phase_1:g} epochs) must end before "
                f"train.epochs ({epochs}): phase 2 trains the student alone"
            )
        if options.weighting_milestones is None:
            options.weighting_milestones = [
                round(phase_1 * m / OFFICIAL_PHASE_1, 2) for m in OFFICIAL_WEIGHTING_DROPS
            ]
        if options.student_milestones is None:
            options.student_milestones = [
                round(phase_2 * m / OFFICIAL_PHASE_2, 2) for m in OFFICIAL_STUDENT_DROPS
            ]

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
        if shape is None or len(shape) not in (3, 4, 5):
            raise UserError(
                f"distill.options.feature_node: {node} has shape {shape}, not a feature map "
                "[B, C, (T,) H, W] or tokens [B, N, C]"
            )
        channels = shape[1] if len(shape) >= 4 else shape[2]
        weighting = InstanceWeighting(len(ctx.teachers), channels, self.options.beta_pooling)
        return nn.ModuleDict({"weighting": weighting})

    def parameter_groups(self, ctx: MethodContext) -> list[dict]:
        return [
            {
                "name": "weighting",
                "params": list(ctx.modules["weighting"].parameters()),
                "lr": self.options.weighting_lr,
                "weight_decay": 0.0,  # the method's own penalty term regularises theta and W
            }
        ]

    def lr_factors(self, schedule: Callable[[float], float]) -> dict[str, Callable[[float], float]]:
        """Two phases: theta and W on their milestones in phase 1 and still after it; every other group
        (the student's) constant in phase 1, then on the student milestones counted from phase 2's
        start. One phase: theta and W on ``schedule`` until ``weighting_epochs``, if given."""
        o, gamma = self.options, self.spec.optim.schedule.gamma
        end = o.weighting_epochs
        if not o.two_phase:
            if end is None:
                return {}
            return {"weighting": lambda epoch: schedule(epoch) if epoch < end else 0.0}

        def steps(milestones: list[float], epoch: float) -> float:
            return gamma ** sum(epoch >= m for m in milestones)

        return {
            "weighting": lambda epoch: steps(o.weighting_milestones, epoch) if epoch < end else 0.0,
            "*": lambda epoch: 1.0 if epoch < end else steps(o.student_milestones, epoch - end),
        }

    def complete(self, ctx: MethodContext, out: SystemOutput) -> None:
        weights = ctx.modules["weighting"](out.extras[LAST_FEATURE_MAP])
        out.extras["instance_weights"] = weights
        out.stats[INSTANCE] = weights.detach().mean(0)
        out.teacher_logits = combined_from_probabilities(
            tuple(z.detach() for z in out.each_teacher_logits), weights.detach()
        )

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        d, o = self.distill, self.options
        weights = out.extras["instance_weights"]  # [B, K]: trains theta and W (and the student, via beta)
        probs = torch.stack([F.softmax(z.detach().float() / d.tau, dim=1) for z in out.each_teacher_logits])
        target = (weights.t().unsqueeze(-1) * probs).sum(0)  # p_T [B, classes]
        target = target.clamp_min(torch.finfo(target.dtype).tiny)  # finite gradients where p_T underflows
        terms = self.student_ce(out, labels)
        kd = losses.soft_kl_from_probs(target, out.student_logits, d.tau, detach_target=False)
        terms["kd_student"] = kd / target.shape[1] if o.kl_reduction == "elementwise_mean" else kd
        total = d.alpha * terms["ce_student"] + d.beta * terms["kd_student"]
        if o.angle_weight:
            terms["rkd_angle"] = losses.rkd_angle(out.student_logits, target)
            total = total + o.angle_weight * terms["rkd_angle"]
        if o.distance_weight:
            terms["rkd_distance"] = losses.rkd_distance(out.student_logits, target)
            total = total + o.distance_weight * terms["rkd_distance"]
        terms["weighting_penalty"] = ctx.modules["weighting"].penalty()
        penalty = o.weighting_decay * terms["weighting_penalty"]
        if o.two_phase:  # the official code drops the penalty with the weighting module, in phase 2
            penalty = penalty * (ctx.epoch < o.weighting_epochs).to(penalty.dtype)
        terms["total"] = self.add_feature_terms(ctx, out, terms, total + penalty)
        return terms

    def logits_loss(self) -> LogitsLoss:
        return LogitsLoss("KD from the instance-weighted teachers", "each", "weighting", LAST_FEATURE_MAP)

    @classmethod
    def describe(cls, spec: Spec) -> str:
        d, o = spec.distill, spec.distill.options
        classes = (spec.student.kwargs or {}).get("num_classes", 1000)
        if o["kl_reduction"] == "elementwise_mean":
            effective = d.beta * d.tau**2 / classes
            kd = (
                f"{d.beta:g} KD_S (from the instance-weighted teachers, tau {d.tau:g}; KL averaged over the "
                f"{classes} classes as the official nn.KLDivLoss(): {d.beta:g} x {d.tau:g}^2 / {classes} = "
                f"{effective:.3g} per unit of batch-mean KL, {effective / d.alpha:.3g}x the CE weight)"
                if d.alpha
                else f"{d.beta:g} KD_S (tau {d.tau:g}, KL averaged over the {classes} classes)"
            )
        else:
            kd = f"{d.beta:g} KD_S (from the instance-weighted teachers, tau {d.tau:g}; batch-mean KL)"
        text = f"{d.alpha:g} CE_S + {kd}"
        text += feature_text(spec) + (
            " (student tap j from teacher j mod K)" if d.feature_loss != "none" else ""
        )
        if o["angle_weight"] or o["distance_weight"]:
            text += f" + {o['angle_weight']:g} RKD angle + {o['distance_weight']:g} RKD distance (z_S vs p_T)"
        text += f" + {o['weighting_decay']:g} |W, theta|^2; beta(x) {o['beta_pooling']}-pooled"
        text += f"; weighting module lr {o['weighting_lr']:g}"
        if o["two_phase"]:
            text += (
                f"; phase 1 ({o['weighting_epochs']:g} epochs): student lr constant, weighting lr "
                f"x{spec.optim.schedule.gamma:g} at epochs {_epochs(o['weighting_milestones'])}; phase 2 "
                f"({spec.train.epochs - o['weighting_epochs']:g} epochs): the student alone, lr "
                f"x{spec.optim.schedule.gamma:g} at {_epochs(o['student_milestones'])} of the phase"
            )
        elif o["weighting_epochs"]:
            text += f", frozen after epoch {o['weighting_epochs']:g}"
        return text


def _epochs(milestones: list[float]) -> str:
    return ", ".join(f"{m:g}" for m in milestones) or "none"
